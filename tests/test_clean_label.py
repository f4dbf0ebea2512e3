"""Clean-label attack: PGD bounds and effect, two devices = one device, triggers, poisoning, surrogate cache."""
import contextlib
import logging
import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from abl_jax import attacks, cache, data, models, train
from abl_jax.attacks import badnets, clean_label, input_aware_train, pgd, surrogate
from abl_jax.attacks.clean_label_figure import save_examples_png
from configs import abl_clean_label, abl_input_aware

SIZE, CLASSES, MEAN, STD = 8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def net():
  """A tiny untrained CNN on 8x8 images, its variables, and a batch whose pixels touch 0 and 255."""
  # The surrogate of _config() below, initialised as it will be: its training reuses this compilation.
  model = models.create_model("small_cnn", CLASSES, 4)
  state = train.create_train_state(model, train.sgd(0.0, 0.9, 0.0), jax.random.PRNGKey(0), (SIZE, SIZE, 3))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
  images[0] = 0
  images[1] = 255
  labels = (np.arange(8) % CLASSES).astype(np.int32)
  return model, variables, images, labels


def _loss(model, variables, images, labels):
  logits = model.apply(variables, train.preprocess(np.asarray(images), MEAN, STD), train=False)
  return float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))


@pytest.mark.parametrize("norm,eps,step", [("linf", 7.5, 2.0), ("l2", 300.0, 60.0)])
def test_pgd_raises_loss_stays_in_ball_and_range(net, norm, eps, step):
  model, variables, x, y = net
  attack = pgd.make_pgd(model, MEAN, STD, norm=norm, eps=eps, step=step, steps=4, random_start=True)
  adv = np.asarray(attack(variables, x, y, jax.random.PRNGKey(1), 0))
  assert adv.dtype == np.uint8 and adv.shape == x.shape
  d = adv.astype(np.int64) - x.astype(np.int64)
  if norm == "linf":
    assert np.abs(d).max() <= 7  # floor(eps): rounding to uint8 never leaves the ball.
  else:
    assert np.all(np.sum(d * d, axis=(1, 2, 3)) <= eps * eps)  # Exact: integer squares.
  assert np.abs(d).max() > 0
  assert _loss(model, variables, adv, y) > _loss(model, variables, x, y) + 0.01
  # Same key, same output; the random start depends on the key.
  np.testing.assert_array_equal(adv, attack(variables, x, y, jax.random.PRNGKey(1), 0))
  assert not np.array_equal(adv, np.asarray(attack(variables, x, y, jax.random.PRNGKey(2), 0)))


def test_pgd_on_two_devices_equals_one_device(net):
  model, variables, x, y = net
  assert jax.local_device_count() == 2
  kwargs = dict(norm="linf", eps=7.5, step=2.0, steps=4, random_start=True)
  one = train.make_mesh(jax.local_devices()[:1])
  single = pgd.perturb(pgd.make_pgd(model, MEAN, STD, one, **kwargs), variables, x, y, jax.random.PRNGKey(3), 8, one)
  two = pgd.make_pgd(model, MEAN, STD, **kwargs)  # Every device.
  # Batches of 4 over 2 devices (two calls, so the start offsets matter too), and one padded odd tail.
  np.testing.assert_array_equal(pgd.perturb(two, variables, x, y, jax.random.PRNGKey(3), 4), single)
  np.testing.assert_array_equal(pgd.perturb(two, variables, x[:7], y[:7], jax.random.PRNGKey(3), 4), single[:7])


def test_triggers():
  x = np.full((2, 8, 8, 3), 100, np.uint8)
  np.testing.assert_array_equal(clean_label.apply_trigger(x, "corner"), badnets.apply_trigger(x))
  grid = np.asarray(badnets.PATTERN)[:, :, None]
  allc = np.asarray(clean_label.apply_trigger(x, "all_corners"))
  for r in (slice(0, 3), slice(5, 8)):
    for c in (slice(0, 3), slice(5, 8)):
      np.testing.assert_array_equal(allc[:, r, c], np.broadcast_to(grid, (2, 3, 3, 3)))
  assert np.all(allc[:, 3:5] == 100) and np.all(allc[:, :, 3:5] == 100)
  amp = np.asarray(clean_label.apply_trigger(x, "corner", 16.0))
  np.testing.assert_array_equal(amp[:, 5:, 5:], np.where(grid > 0, 116, 84) + np.zeros((2, 3, 3, 3), np.uint8))
  assert np.all(amp[:, :5] == 100)
  edge = np.asarray(clean_label.apply_trigger(np.full((1, 8, 8, 3), 250, np.uint8), "corner", 16.0))
  assert edge.max() == 255 and edge.min() == 234  # Clipped at 255.


def _config(tmp_path, **pgd_overrides):
  c = abl_clean_label.get_config("smoke")
  c.data.synthetic_train_size, c.data.image_size, c.data.cache_dir = 60, SIZE, str(tmp_path)
  c.data.synthetic_classes = CLASSES
  c.attack.target_label, c.attack.poison_rate = 1, 0.1  # 6 of the 20 class-1 images.
  s = c.attack.surrogate
  s.width, s.epochs, s.batch_size = 4, 1, 16
  c.train.eval_batch_size = 16
  c.attack.pgd.update(steps=2, batch_size=4, **pgd_overrides)
  return c


def test_poison_touches_target_images_only_keeps_labels_and_caches_surrogate(tmp_path, caplog, net):
  c = _config(tmp_path)
  train_set, _ = data.load(c.data, seed=c.seed)
  key = jax.random.PRNGKey(5)
  with caplog.at_level(logging.INFO):
    out = attacks.poison(c.attack, train_set, key, config=c)
  assert "surrogate: no cache" in caplog.text and "10.00% of the set, 30.00% of target class 1" in caplog.text
  mask = out.is_poisoned
  assert mask.sum() == 6 and np.all(train_set.labels[mask] == 1)
  np.testing.assert_array_equal(out.train.labels, train_set.labels)
  changed = np.any(out.train.images != train_set.images, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, mask)
  # Outside the trigger, poisoned images moved by at most eps; the trigger is stamped.
  d = out.train.images[mask].astype(np.int64) - train_set.images[mask]
  assert np.abs(d[:, :-3]).max() <= c.attack.pgd.eps and np.abs(d[:, :-3]).max() > 0
  np.testing.assert_array_equal(out.train.images[mask], badnets.apply_trigger(out.train.images[mask]))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = attacks.poison(c.attack, train_set, key, config=c)
  assert "surrogate: reusing" in caplog.text
  np.testing.assert_array_equal(again.train.images, out.train.images)
  test = attacks.poisoned_test_set(train_set, out, 1)  # Test-time: trigger only, no PGD.
  np.testing.assert_array_equal(test.images, badnets.apply_trigger(train_set.images[train_set.labels != 1]))


@pytest.mark.parametrize("field,value", [("pgd.norm", "l1"), ("trigger_style", "middle"),
                                         ("surrogate.model", "vgg"), ("pgd.eps", 0.0)])
def test_bad_fields_name_themselves(tmp_path, field, value):
  c = _config(tmp_path)
  group, _, name = field.rpartition(".")
  (c.attack[group] if group else c.attack)[name] = value
  train_set, _ = data.load(c.data, seed=c.seed)
  with pytest.raises(ValueError, match=f"config.attack.{field}="):
    attacks.poison(c.attack, train_set, jax.random.PRNGKey(0), config=c)


def test_surrogate_cache_key_follows_config(tmp_path):
  c = _config(tmp_path)
  train_set, _ = data.load(c.data, seed=c.seed)
  path = surrogate.cache_path(c, train_set)
  assert path.startswith(str(tmp_path / "surrogates"))
  c.attack.surrogate.adversarial = False
  assert surrogate.cache_path(c, train_set) != path


def test_trained_attack_models_are_cached_per_set_of_kernels(tmp_path, monkeypatch):
  # Other CPU kernels train another surrogate or generator (session 19: input-aware's differed), so a model
  # cached under one set is never reused under another.
  c = _config(tmp_path)
  train_set, _ = data.load(c.data, seed=c.seed)
  ia = abl_input_aware.get_config("smoke")
  paths = [surrogate.cache_path(c, train_set), input_aware_train.cache_path(ia, train_set)]
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=default")
  assert surrogate.cache_path(c, train_set) != paths[0]
  assert input_aware_train.cache_path(ia, train_set) != paths[1]


def test_save_examples_png(tmp_path, net):
  x = net[2][:3]
  save_examples_png(str(tmp_path / "x.png"), x, [("linf 8", x), ("linf 16", x)], x, scale=2)
  with Image.open(tmp_path / "x.png") as im:
    assert im.format == "PNG" and im.size[0] > 4 * 2 * SIZE and im.size[1] > 3 * 2 * SIZE


def test_attack_models_are_made_under_their_cache_entrys_lock(tmp_path, monkeypatch):
  c = _config(tmp_path)
  train_set, _ = data.load(c.data, seed=c.seed)
  ia = abl_input_aware.get_config("smoke")
  held = []

  @contextlib.contextmanager
  def exclusive(path):
    held.append(path)
    yield

  monkeypatch.setattr(cache, "exclusive", exclusive)
  monkeypatch.setattr(surrogate, "_load_or_train", lambda config, s, path: ("made", held[-1] == path))
  monkeypatch.setattr(input_aware_train, "_load_or_train", lambda config, s, path: ("made", held[-1] == path))
  assert surrogate.load_or_train(c, train_set) == ("made", True)
  assert input_aware_train.load_or_train(ia, train_set) == ("made", True)
  assert held == [surrogate.cache_path(c, train_set), input_aware_train.cache_path(ia, train_set)]
