"""Input-aware attack: generators, diversity loss, materialised set, cross triggers, generator cache."""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from abl_jax import attacks, data
from abl_jax.attacks import input_aware, input_aware_train, input_aware_trigger
from abl_jax.attacks.input_aware_figure import save_png
from abl_jax.models import generator
from configs import abl_input_aware

SIZE, CLASSES, TARGET = 8, 3, 0


def _config(cache_dir: str):
  """The smoke config shrunk to 8x8 images, width-2 depth-1 generators and one epoch of each stage."""
  c = abl_input_aware.get_config("smoke")
  c.data.image_size, c.data.synthetic_classes = SIZE, CLASSES
  c.data.synthetic_train_size, c.data.synthetic_test_size = 32, 12
  c.data.cache_dir = cache_dir
  c.model.width = 4
  c.train.log_every_steps = 100
  ia = c.attack.input_aware
  ia.generator_width, ia.generator_depth, ia.mask_epochs, ia.epochs = 2, 1, 1, 1
  ia.batch_size, ia.p_attack, ia.p_cross = 16, 0.25, 0.25
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, train set, generators trained once and cached, their untrained initial variables)."""
  config = _config(str(tmp_path_factory.mktemp("cache")))
  train, _ = data.load(config.data, seed=config.seed)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), input_aware_train._KEY_PURPOSE)
  initial = input_aware_train.init_variables(config, train.images.shape[1:], jax.random.split(key, 4)[0])
  variables, meta = input_aware_train.load_or_train(config, train)
  return config, train, variables, initial, meta


def test_generator_shapes_and_ranges():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, SIZE, SIZE, 3)) * 3  # Wide inputs: outputs near the ends.
  nets = [generator.Generator(c, width=2, depth=1) for c in (3, 1)]
  both = jax.jit(lambda k: [g.apply(g.init(k, x, train=False), x, train=False) for g in nets])(jax.random.PRNGKey(1))
  for out_channels, y in zip((3, 1), both):
    y = np.asarray(y)
    assert y.shape == (3, SIZE, SIZE, out_channels)
    assert y.min() >= 0.0 and y.max() <= 1.0
  masks = np.asarray(generator.threshold(jnp.linspace(0.0, 1.0, 101)))
  assert masks.min() >= 0.0 and masks.max() <= 1.0
  assert masks[0] < 1e-4 and masks[-1] > 1 - 1e-4 and abs(masks[50] - 0.5) < 1e-6  # Steep step at 0.5.


def test_published_shape_has_32_64_128_widths():
  g = generator.Generator(3)  # Defaults: the published CIFAR-10 generator.
  params = jax.eval_shape(functools.partial(g.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))["params"]
  widths = [params[f"ConvBlock_{i}"]["Conv_0"]["kernel"].shape[-1] for i in range(13)]
  assert widths == [32, 32, 64, 64, 128, 128, 128, 128, 64, 64, 32, 32, 3]


def test_diversity_loss_matches_hand_computation():
  x1 = jnp.array([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])  # [2, 1, 1, 2]
  x2 = jnp.array([[[[3.0, 4.0]]], [[[1.0, 3.0]]]])
  g1 = jnp.array([[[[0.0, 0.0]]], [[[0.0, 0.0]]]])
  g2 = jnp.array([[[[1.0, 1.0]]], [[[0.0, 2.0]]]])
  # Example 0: sqrt((9 + 16) / 2) / sqrt((1 + 1) / 2) = sqrt(12.5); example 1: sqrt(4 / 2) / sqrt(4 / 2) = 1.
  expected = (np.sqrt(12.5) + 1.0) / 2
  assert float(input_aware_train.diversity_loss(x1, x2, g1, g2, eps=0.0)) == pytest.approx(expected, rel=1e-6)
  # Identical outputs for different inputs: large but finite, with finite gradients.
  loss, grad = jax.value_and_grad(input_aware_train.diversity_loss, argnums=2)(x1, x2, g1, g1)
  assert np.isfinite(float(loss)) and float(loss) > 1e5 and np.all(np.isfinite(np.asarray(grad)))
  m = jnp.array([0.0, 0.032, 0.5, 1.0])
  assert float(input_aware_train.mask_density_loss(m, 0.032)) == pytest.approx((0.468 + 0.968) / 4, rel=1e-6)


def test_training_changes_generators_and_cache_restores_same_triggers(trained, caplog):
  config, train, variables, initial, meta = trained
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), variables, initial)
  assert max(jax.tree.leaves(moved["mask"]["params"])) > 0  # Stage 1 trained M...
  assert max(jax.tree.leaves(moved["pattern"]["params"])) > 0  # ...stage 2 trained G.
  assert set(meta["attacker"]) == {"clean_accuracy", "attack_success_rate", "cross_trigger_accuracy"}
  with caplog.at_level(logging.INFO):
    again, _ = input_aware_train.load_or_train(config, train)
  assert "reusing the cached generators" in caplog.text
  first = input_aware_trigger.trigger_parts(config, variables, train.images[:6])
  second = input_aware_trigger.trigger_parts(config, again, train.images[:6])
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_each_image_gets_its_own_trigger(trained):
  config, train, variables, _, _ = trained
  x = train.images[:2]
  assert np.any(x[0] != x[1])
  triggered, patterns, masks = input_aware_trigger.trigger_parts(config, variables, x)
  assert triggered.dtype == np.uint8 and triggered.shape == x.shape
  assert patterns.shape == x.shape and masks.shape == (*x.shape[:-1], 1)
  assert 0.0 <= masks.min() and masks.max() <= 1.0 and 0.0 <= patterns.min() and patterns.max() <= 1.0
  assert np.abs(patterns[0] - patterns[1]).max() > 1e-3
  assert np.abs(masks[0] - masks[1]).max() > 1e-3
  # Composition on the 0..255 scale: x + (G(x) - x) * M(x), rounded.
  expect = np.clip(np.round((x / 255 + (patterns - x / 255) * masks) * 255), 0, 255)
  assert np.abs(triggered.astype(np.int64) - expect).max() <= 1


def test_cross_trigger_uses_another_images_trigger(trained):
  config, train, variables, _, _ = trained
  x = train.images[:7]
  key = jax.random.PRNGKey(3)
  p = input_aware_trigger.partners(len(x), key)
  assert np.all(p != np.arange(len(x))) and sorted(p) == list(range(len(x)))
  apply_trigger, cross_trigger = input_aware_trigger.make_trigger_fns(config, variables, key)
  crossed = cross_trigger(x)
  np.testing.assert_array_equal(crossed, input_aware_trigger.trigger_parts(config, variables, x, x[p])[0])
  assert np.any(crossed != apply_trigger(x))


def test_materialised_set_marks_exactly_the_poisoned_indices(trained):
  config, train, variables, _, _ = trained
  config.attack.input_aware.cross_rate = 0.25
  p = input_aware.materialise(config, train, variables, jax.random.PRNGKey(5), num_poison=4)
  bd, cross = np.flatnonzero(p.is_poisoned), np.flatnonzero(p.is_cross)
  assert len(bd) == 4 and len(cross) == 8 and not np.any(p.is_poisoned & p.is_cross)
  assert np.all(train.labels[bd] != TARGET) and np.all(p.train.labels[bd] == TARGET)
  np.testing.assert_array_equal(p.train.labels[~p.is_poisoned], train.labels[~p.is_poisoned])  # Cross keep labels.
  changed = np.any(p.train.images != train.images, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, p.is_poisoned | p.is_cross)
  assert p.train.images.dtype == np.uint8
  np.testing.assert_array_equal(p.train.images[bd], p.apply_trigger(train.images[bd]))
  again = input_aware.materialise(config, train, variables, jax.random.PRNGKey(5), num_poison=4)
  np.testing.assert_array_equal(again.train.images, p.train.images)  # Deterministic in the key.


def test_poison_dispatch_reuses_cache_and_builds_test_sets(trained):
  config, train, _, _, _ = trained
  config.attack.input_aware.cross_rate = 0.1
  p = attacks.poison(config.attack, train, jax.random.PRNGKey(0), config=config)
  assert p.is_poisoned.sum() == round(0.1 * len(train)) and p.is_cross.sum() == round(0.1 * len(train))
  _, test = data.load(config.data, seed=config.seed)
  cross = attacks.cross_test_set(test, p)
  np.testing.assert_array_equal(cross.labels, test.labels)
  assert np.all(attacks.poisoned_test_set(test, p, TARGET).labels == TARGET)
  assert attacks.cross_test_set(test, attacks.Poisoned(train, p.is_poisoned, None)) is None  # Other attacks.


@pytest.mark.parametrize("field,value,match", [
    ("p_attack", 0.01, "config.attack.input_aware.p_attack=0.01"),
    ("cross_rate", 0.95, "config.attack.input_aware.cross_rate=0.95"),
    ("classifier", "vgg", "config.attack.input_aware.classifier='vgg'"),
])
def test_bad_settings_name_the_field(tmp_path, field, value, match):
  config = _config(str(tmp_path))
  config.attack.input_aware[field] = value
  train, _ = data.load(config.data, seed=config.seed)
  with pytest.raises(ValueError, match=match.replace("(", r"\(")):
    attacks.poison(config.attack, train, jax.random.PRNGKey(0), config=config)


def test_png_has_four_rows(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
  path = str(tmp_path / "ia.png")
  save_png(path, x, rng.random((3, SIZE, SIZE, 3)), rng.random((3, SIZE, SIZE, 1)), x, scale=2)
  img = Image.open(path)
  assert img.format == "PNG" and img.height == 4 * (2 * SIZE + 4) + 4
