"""Attacks: exact trigger pixels, who gets poisoned, labels, determinism, errors."""
import jax
import numpy as np
import pytest
from PIL import Image

from abl_jax import attacks
from abl_jax.attacks import badnets, blend, sig
from abl_jax.data import Dataset
from configs import common

N, CLASSES, TARGET = 200, 10, 3


def _dataset(n=N, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = (np.arange(n) % CLASSES).astype(np.int32)  # 20 images per class.
  return Dataset(images, labels, tuple(f"c{i}" for i in range(CLASSES)))


def _cfg(name, **overrides):
  cfg = common.base_config().attack
  cfg.name, cfg.target_label, cfg.poison_rate = name, TARGET, 0.1
  cfg.update(overrides)
  return cfg


def _key(seed=0):
  return jax.random.PRNGKey(seed)


def test_badnets_trigger_pixels_exact_and_rest_unchanged():
  x = _dataset(4).images
  y = np.asarray(badnets.apply_trigger(x))
  assert y.dtype == np.uint8
  grid = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]], np.uint8)
  expected = np.broadcast_to(grid[None, :, :, None], (4, 3, 3, 3))
  np.testing.assert_array_equal(y[:, 29:, 29:, :], expected)
  changed = np.zeros((32, 32), bool)
  changed[29:, 29:] = True
  np.testing.assert_array_equal(y[:, ~changed], x[:, ~changed])


def test_badnets_poison_counts_labels_and_mask():
  train = _dataset()
  out = attacks.poison(_cfg("badnets", poison_rate=0.1), train, _key())
  mask = out.is_poisoned
  assert mask.dtype == bool and mask.sum() == round(0.1 * N)
  assert np.all(train.labels[mask] != TARGET)  # Every poisoned example is a real label flip.
  assert np.all(out.train.labels[mask] == TARGET)
  np.testing.assert_array_equal(out.train.labels[~mask], train.labels[~mask])
  changed = np.any(out.train.images != train.images, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, mask)
  np.testing.assert_array_equal(out.train.images[mask], badnets.apply_trigger(train.images[mask]))


def test_poison_count_is_at_least_one():
  out = attacks.poison(_cfg("badnets", poison_rate=1e-6), _dataset(), _key())
  assert out.is_poisoned.sum() == 1


def test_blend_arithmetic_by_hand():
  x = np.full((1, 2, 2, 3), 100, np.uint8)
  pattern = np.full((2, 2, 3), 200, np.uint8)
  y = np.asarray(blend.apply_trigger(x, pattern, 0.2))
  assert y.dtype == np.uint8 and np.all(y == 120)
  np.testing.assert_array_equal(blend.apply_trigger(x, pattern, 0.0), x)
  np.testing.assert_array_equal(blend.apply_trigger(x, pattern, 1.0), pattern[None])
  # 0.5 * 1 + 0.5 * 254 = 127.5 rounds to an integer and stays in range.
  half = blend.apply_trigger(np.ones((1, 1, 1, 1), np.uint8), np.full((1, 1, 1), 254), 0.5)
  assert 127 <= int(half[0, 0, 0, 0]) <= 128


def test_blend_noise_pattern_deterministic_in_seed():
  a = blend.make_pattern("noise", 0, (32, 32, 3))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, blend.make_pattern("noise", 0, (32, 32, 3)))
  assert not np.array_equal(a, blend.make_pattern("noise", 1, (32, 32, 3)))
  assert a.min() < 20 and a.max() > 235  # Spans the range.


def test_blend_image_pattern_resized(tmp_path):
  path = tmp_path / "pattern.png"
  Image.new("L", (8, 5), color=77).save(path)  # Grayscale, 8 wide x 5 high.
  p = blend.make_pattern(str(path), 0, (32, 16, 3))
  assert p.shape == (32, 16, 3) and p.dtype == np.uint8
  assert np.all(p == 77)


def test_blend_poison_uses_pattern_and_flips_labels():
  train = _dataset()
  cfg = _cfg("blend", alpha=0.2, pattern_seed=5)
  out = attacks.poison(cfg, train, _key())
  mask = out.is_poisoned
  pattern = blend.make_pattern("noise", 5, (32, 32, 3))
  expected = np.asarray(blend.apply_trigger(train.images[mask], pattern, 0.2))
  np.testing.assert_array_equal(out.train.images[mask], expected)
  np.testing.assert_array_equal(out.train.images[~mask], train.images[~mask])
  assert np.all(out.train.labels[mask] == TARGET) and np.all(train.labels[mask] != TARGET)


def test_sig_signal_values_by_hand():
  v = np.asarray(sig.signal(4, 32, 20.0, 8.0))  # Period 4 columns.
  assert v.shape == (4, 32, 1) and v.dtype == np.float32
  np.testing.assert_allclose(v[0, [0, 1, 2, 3, 4]], [[0], [20], [0], [-20], [0]], atol=1e-4)
  np.testing.assert_array_equal(v, np.broadcast_to(v[:1], v.shape))  # Same on every row.


def test_sig_trigger_same_on_channels_and_clips():
  x = np.full((2, 4, 32, 3), 128, np.uint8)
  y = np.asarray(sig.apply_trigger(x, 20.0, 8.0)).astype(int)
  assert y[0, 0, 0, 0] == 128 and y[0, 0, 1, 0] == 148 and y[0, 0, 3, 0] == 108
  np.testing.assert_array_equal(y, np.broadcast_to(y[:1, :1, :, :1], y.shape))
  lo = np.asarray(sig.apply_trigger(np.full((1, 1, 32, 1), 5, np.uint8), 20.0, 8.0))
  hi = np.asarray(sig.apply_trigger(np.full((1, 1, 32, 1), 250, np.uint8), 20.0, 8.0))
  assert lo.dtype == np.uint8 and lo[0, 0, 3, 0] == 0 and lo[0, 0, 1, 0] == 25
  assert hi[0, 0, 1, 0] == 255 and hi[0, 0, 3, 0] == 230


def test_sig_poisons_target_class_only_and_keeps_labels():
  train = _dataset()
  out = attacks.poison(_cfg("sig", poison_rate=0.05), train, _key())
  mask = out.is_poisoned
  assert mask.sum() == 10 and np.all(train.labels[mask] == TARGET)
  np.testing.assert_array_equal(out.train.labels, train.labels)
  changed = np.any(out.train.images != train.images, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, mask)


def test_sig_rate_above_target_share_rejected():
  with pytest.raises(ValueError, match=r"config\.attack\.poison_rate=0\.2 .*only 20 target-class .*max rate 0\.1000"):
    attacks.poison(_cfg("sig", poison_rate=0.2), _dataset(), _key())


def test_poison_deterministic_in_key_and_input_not_mutated():
  train = _dataset()
  images, labels = train.images.copy(), train.labels.copy()
  a = attacks.poison(_cfg("badnets"), train, _key(0))
  b = attacks.poison(_cfg("badnets"), train, _key(0))
  c = attacks.poison(_cfg("badnets"), train, _key(1))
  np.testing.assert_array_equal(a.is_poisoned, b.is_poisoned)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert not np.array_equal(a.is_poisoned, c.is_poisoned)
  np.testing.assert_array_equal(train.images, images)
  np.testing.assert_array_equal(train.labels, labels)


def test_none_returns_train_unchanged():
  train = _dataset()
  out = attacks.poison(_cfg("none"), train, _key())
  assert out.train is train and out.apply_trigger is None and not out.is_poisoned.any()
  assert out.is_poisoned.shape == (N,)
  with pytest.raises(ValueError, match="trigger"):
    attacks.poisoned_test_set(train, out, TARGET)


@pytest.mark.parametrize("name", ["badnets", "blend", "sig"])
def test_poisoned_test_set_excludes_target_and_labels_target(name):
  train, test = _dataset(), _dataset(50, seed=1)
  out = attacks.poison(_cfg(name, poison_rate=0.05), train, _key())
  ptest = attacks.poisoned_test_set(test, out, TARGET)
  keep = test.labels != TARGET
  assert len(ptest) == keep.sum() == 45
  assert ptest.labels.dtype == np.int32 and np.all(ptest.labels == TARGET)
  np.testing.assert_array_equal(ptest.images, out.apply_trigger(test.images[keep]))
  assert isinstance(ptest.images, np.ndarray) and ptest.images.dtype == np.uint8


def test_apply_trigger_chunks_match_one_call():
  x = _dataset(20).images
  chunked = attacks.apply_in_chunks(badnets.apply_trigger, x, chunk_size=7)
  np.testing.assert_array_equal(chunked, badnets.apply_trigger(x))


@pytest.mark.parametrize("overrides, message", [
    (dict(name="trojan"), r"config\.attack\.name='trojan' is unknown; allowed: none, badnets, blend, sig"),
    (dict(target_label=10), r"config\.attack\.target_label=10 must be in 0\.\.9"),
    (dict(target_label=-1), r"config\.attack\.target_label=-1 must be in 0\.\.9"),
    (dict(poison_rate=0.0), r"config\.attack\.poison_rate=0\.0 must be in \(0, 1\]"),
    (dict(poison_rate=1.5), r"config\.attack\.poison_rate=1\.5 must be in \(0, 1\]"),
    (dict(name="blend", alpha=1.5), r"config\.attack\.alpha=1\.5 must be in \[0, 1\]"),
    (dict(poison_rate=0.95), r"config\.attack\.poison_rate=0\.95 .*only 180 non-target .*max rate 0\.9000"),
])
def test_bad_inputs_name_the_field(overrides, message):
  cfg = _cfg("badnets")
  cfg.update(overrides)
  with pytest.raises(ValueError, match=message):
    attacks.poison(cfg, _dataset(), _key())


def test_poison_logs_counts_and_shares(caplog):
  caplog.set_level("INFO")
  attacks.poison(_cfg("sig", poison_rate=0.05), _dataset(), _key())
  assert "sig: poisoned 10 of 200 training images (5.00% of the set, 50.00% of target class 3)" in caplog.text
