"""WaNet: warping against a slow reference, the field, noise mode, rate accounting, the smoke run end to end."""
import json

import jax
import numpy as np
import pytest

from abl_jax import attacks, data, experiment
from abl_jax.attacks import wanet
from configs import abl_wanet, table as table_config


def _reference_grid_sample(images: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """PyTorch's grid_sample (bilinear, align_corners=True, zero padding), one pixel at a time."""
  n, h, w, c = images.shape
  out = np.zeros((n, *grid.shape[1:3], c))
  for b in range(n):
    for i in range(grid.shape[1]):
      for j in range(grid.shape[2]):
        x, y = (grid[b, i, j, 0] + 1) / 2 * (w - 1), (grid[b, i, j, 1] + 1) / 2 * (h - 1)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
          if 0 <= yy < h and 0 <= xx < w:
            out[b, i, j] += (1 - abs(x - xx)) * (1 - abs(y - yy)) * images[b, yy, xx]
  return out


def test_warp_of_a_known_image_by_a_known_field_gives_hand_computed_pixels():
  image = np.array([[0, 100], [200, 40]], np.uint8)[None, :, :, None]  # 2x2, one channel
  # (x, y) grid points: the centre, the top-right corner, halfway down the right column, outside (zeros).
  field = np.array([[[0.0, 0.0], [1.0, -1.0]], [[1.0, 0.0], [3.0, 0.0]]], np.float32)
  out = np.asarray(wanet.warp(image, field))[0, :, :, 0]
  # centre: (0 + 100 + 200 + 40) / 4 = 85; corner: 100; right column halfway: (100 + 40) / 2 = 70;
  # x = 3 is pixel column (3 + 1) / 2 * (2 - 1) = 2, past the last column (1): zero padding gives 0.
  np.testing.assert_array_equal(out, [[85, 100], [70, 0]])


def test_grid_sample_equals_the_slow_reference_with_zero_padding():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  images = np.asarray(jax.random.uniform(k1, (2, 5, 6, 3), minval=0, maxval=255))
  grid = np.asarray(jax.random.uniform(k2, (2, 4, 7, 2), minval=-1.3, maxval=1.3))  # Some points outside.
  got = np.asarray(wanet.grid_sample(images, grid))
  np.testing.assert_allclose(got, _reference_grid_sample(images, grid), rtol=1e-5, atol=1e-3)


def test_identity_field_leaves_images_unchanged():
  images = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (3, 7, 5, 3), 0, 256), np.uint8)
  np.testing.assert_array_equal(np.asarray(wanet.warp(images, wanet.identity_grid(7, 5))), images)
  zero_strength = wanet.make_field(jax.random.PRNGKey(1), 7, 5, 4, 0.0)
  np.testing.assert_array_equal(np.asarray(wanet.warp(images, zero_strength)), images)


def test_bicubic_upsampling_matches_pytorch_weights_by_hand():
  m = wanet.upsample_matrix(3, 5)  # Output 1 sits halfway between inputs 0 and 1; index -1 clamps to 0.
  # Keys' kernel (a = -0.75) at distances 1.5, 0.5, 0.5, 1.5: -0.09375, 0.59375, 0.59375, -0.09375.
  np.testing.assert_allclose(m[1], [-0.09375 + 0.59375, 0.59375, -0.09375], atol=1e-7)
  np.testing.assert_allclose(m[[0, 2, 4]], np.eye(3), atol=1e-7)  # align_corners: nodes are kept.
  np.testing.assert_allclose(wanet.upsample_matrix(4, 32).sum(1), 1.0, atol=1e-6)


def test_field_is_deterministic_in_the_key_clamped_and_of_the_reference_size():
  f = np.asarray(wanet.make_field(jax.random.PRNGKey(0), 32, 32, 4, 0.5))
  np.testing.assert_array_equal(f, np.asarray(wanet.make_field(jax.random.PRNGKey(0), 32, 32, 4, 0.5)))
  assert not np.array_equal(f, np.asarray(wanet.make_field(jax.random.PRNGKey(1), 32, 32, 4, 0.5)))
  assert f.shape == (32, 32, 2) and f.min() >= -1 and f.max() <= 1
  offsets = np.asarray(wanet.control_grid(jax.random.PRNGKey(0), 4, 32, 32))
  identity = wanet.identity_grid(32, 32)
  np.testing.assert_allclose(f, np.clip(identity + 0.5 * offsets / 32, -1, 1), atol=1e-6)
  # The control points (mean |value| 1) are the corners of the upsampled offsets.
  ins = offsets[[0, 0, -1, -1], [0, -1, 0, -1]]
  assert np.abs(ins).max() > 0.5 and np.abs(offsets).max() < 4
  moved = np.abs(f - identity).max() * 31 / 2  # In pixels.
  assert 0.1 < moved < 1.0  # WaNet's warp moves pixels by a fraction of a pixel.


def test_noise_mode_adds_per_image_noise_to_the_field():
  images = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (4, 8, 8, 3), 0, 256), np.uint8)
  field = wanet.make_field(jax.random.PRNGKey(2), 8, 8, 4, 0.5)
  grids = np.asarray(wanet.noise_grids(field, jax.random.PRNGKey(5), 4))
  assert np.abs(grids - np.asarray(field)[None]).max() <= 1 / 8 + 1e-6 and grids.min() >= -1 and grids.max() <= 1
  assert not np.array_equal(grids[0], grids[1])
  noisy = np.asarray(wanet.noise_warp(images, field, jax.random.PRNGKey(5), round_output=False))
  np.testing.assert_allclose(noisy, _reference_grid_sample(images.astype(np.float64), grids), atol=1e-3)
  np.testing.assert_array_equal(np.asarray(wanet.noise_warp(images, field, jax.random.PRNGKey(5))),
                                np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _smoke(**attack):
  c = abl_wanet.get_config("smoke")
  c.attack.update(attack)
  return c


def test_rate_accounting_labels_and_determinism():
  c = _smoke(poison_rate=0.05)
  train, test = data.load(c.data, seed=c.seed)
  p = attacks.poison(c.attack, train, jax.random.PRNGKey(7), config=c)
  n = round(0.05 * len(train))
  assert p.is_poisoned.sum() == n and p.is_cross.sum() == 2 * n and not (p.is_poisoned & p.is_cross).any()
  assert (train.labels[p.is_poisoned] != 0).all() and (p.train.labels[p.is_poisoned] == 0).all()
  np.testing.assert_array_equal(p.train.labels[~p.is_poisoned], train.labels[~p.is_poisoned])  # Noise mode keeps labels.
  changed = (p.train.images != train.images).any(axis=(1, 2, 3))
  assert not changed[~p.is_poisoned & ~p.is_cross].any() and changed[p.is_poisoned].mean() > 0.9
  field = wanet.make_field(jax.random.split(jax.random.PRNGKey(7), 4)[0], 32, 32, 4, 0.5)
  np.testing.assert_array_equal(p.train.images[p.is_poisoned], np.asarray(wanet.warp(train.images[p.is_poisoned], field)))
  np.testing.assert_array_equal(p.apply_trigger(test.images[:5]), np.asarray(wanet.warp(test.images[:5], field)))
  again = attacks.poison(c.attack, train, jax.random.PRNGKey(7), config=c)
  np.testing.assert_array_equal(again.train.images, p.train.images)
  np.testing.assert_array_equal(attacks.cross_test_set(test, again).images, attacks.cross_test_set(test, p).images)
  other = attacks.poison(c.attack, train, jax.random.PRNGKey(8), config=c)
  assert not np.array_equal(other.apply_trigger(test.images[:5]), p.apply_trigger(test.images[:5]))
  low = attacks.poison(_smoke(poison_rate=0.01).attack, train, jax.random.PRNGKey(7), config=c)
  assert (low.is_poisoned.sum(), low.is_cross.sum()) == (round(0.01 * len(train)), 2 * round(0.01 * len(train)))


@pytest.mark.parametrize("field, value, match", [
    ("k", 1, "wanet.k=1 must be >= 2"), ("s", -0.1, "wanet.s=-0.1"), ("grid_rescale", 0.0, "grid_rescale=0.0"),
    ("cross_ratio", -1.0, "cross_ratio=-1.0"), ("cross_ratio", 20.0, "cross_ratio=20.0 must be at most")])
def test_bad_settings_name_the_field(field, value, match):
  c = _smoke()
  c.attack.wanet[field] = value
  train, _ = data.load(c.data, seed=c.seed)
  with pytest.raises(ValueError, match=match):
    attacks.poison(c.attack, train, jax.random.PRNGKey(0), config=c)


def test_table_has_wanet_and_low_rate_rows_one_override_apart():
  t = table_config.get_config("smoke")
  for name, attack, rate in (("wanet_none", "wanet", 0.1), ("badnets_1pct_abl", "badnets", 0.01),
                             ("wanet_1pct_none", "wanet", 0.01)):
    assert (t.rows[name].attack.name, t.rows[name].attack.poison_rate) == (attack, rate), name
  assert t.rows.wanet_1pct_abl.to_dict() == {**t.rows.wanet_abl.to_dict(),
                                              "attack": {**t.rows.wanet_abl.attack.to_dict(), "poison_rate": 0.01}}


def test_smoke_run_end_to_end_reports_noise_mode_accuracy(tmp_path):
  c = abl_wanet.get_config("smoke")
  c.defense.name = "none"
  c.train.epochs, c.train.eval_every_epochs = 2, 0
  results = experiment.train_and_evaluate(c, str(tmp_path / "wanet"))
  saved = json.loads((tmp_path / "wanet" / "results.json").read_text())
  assert saved["attack"] == "wanet" and saved["num_poisoned"] == round(0.1 * 1024)
  assert saved["num_noise_mode_train"] == 2 * saved["num_poisoned"]
  assert 0.0 <= saved["noise_mode_accuracy"] <= 1.0 and saved["attack_success_rate"] is not None
  assert results["noise_mode_accuracy"] == saved["noise_mode_accuracy"] and "cross_trigger_accuracy" not in saved
  assert saved["config"]["attack"]["wanet"] == {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}
