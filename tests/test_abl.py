"""ABL losses and isolation: values, signs, picks, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abl_jax import abl, evaluate, train


def test_lga_descends_above_gamma_and_ascends_below():
  high, low = jnp.array([0.6, 1.0]), jnp.array([0.2, 0.4])
  assert abl.lga_loss(high, 0.5) == pytest.approx(0.8)
  assert abl.lga_loss(low, 0.5) == pytest.approx(-0.3)
  # The gradient w.r.t. each example's CE is +1/B above gamma and -1/B below it.
  np.testing.assert_allclose(jax.grad(abl.lga_loss)(high, 0.5), [0.5, 0.5])
  np.testing.assert_allclose(jax.grad(abl.lga_loss)(low, 0.5), [-0.5, -0.5])


def test_flooding_value_and_gradient():
  low = jnp.array([0.2, 0.4])
  assert abl.flooding_loss(low, 0.5) == pytest.approx(0.7)  # |0.3 - 0.5| + 0.5
  np.testing.assert_allclose(jax.grad(abl.flooding_loss)(low, 0.5), jax.grad(abl.lga_loss)(low, 0.5))


def test_lga_sign_uses_global_batch_mean_when_the_batch_is_split_over_devices():
  assert jax.local_device_count() >= 2
  ce = jnp.array([0.2, 0.2, 0.7, 0.7])  # Device means 0.2 and 0.7; global mean 0.45 < gamma.
  mesh = train.make_mesh(jax.local_devices()[:2])
  sharded = jax.device_put(ce, train.batch_sharding(mesh))
  loss = jax.jit(lambda c: abl.lga_loss(c, 0.5), out_shardings=train.replicated(mesh))(sharded)
  assert float(loss) == pytest.approx(-0.45, rel=1e-6)  # One sign for the whole batch: ascent.


def test_small_loss_leaves_out_the_batchs_highest_share():
  ce = jnp.array([1.0, 2.0, 3.0, 4.0, 0.5, 9.0, 7.0])
  labels = jnp.array([0, 0, 0, 0, 1, 1, 2])
  loss = abl.SmallLoss(0.5)
  # The highest 3 are 9.0, 7.0 and 4.0; 7.0 stays: it is all of its label, and the cap leaves it half at least.
  assert loss(ce, labels) == pytest.approx((1.0 + 2.0 + 3.0 + 0.5 + 7.0) / 5)
  np.testing.assert_allclose(jax.grad(loss)(ce, labels), [0.2, 0.2, 0.2, 0, 0.2, 0, 0.2], rtol=1e-6)
  assert abl.SmallLoss(0.0)(ce, labels) == pytest.approx(float(jnp.mean(ce)))
  assert loss(jnp.array([1.0, 1.0, 1.0, 2.0]), jnp.zeros(4, int)) == pytest.approx(1.0)  # One of 3 ties out.


def test_small_loss_leaves_a_label_the_model_has_not_learned_half_its_examples():
  ce = jnp.array([5.0, 6.0, 7.0, 8.0, 0.1, 0.2, 0.3, 0.4])
  labels = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
  assert abl.SmallLoss(0.5)(ce, labels) == pytest.approx((5.0 + 6.0 + 1.0) / 6)  # 8.0 and 7.0 out, not 5.0 and 6.0.
  assert abl.SmallLoss(0.5, label_cap=1.0)(ce, labels) == pytest.approx(0.25)
  # drop=1: each label's highest label_cap share, whatever the others'.
  assert abl.SmallLoss(1.0, label_cap=0.25)(ce, labels) == pytest.approx((5.0 + 6.0 + 7.0 + 0.1 + 0.2 + 0.3) / 6)


def test_small_loss_cuts_the_global_batch_when_it_is_split_over_devices():
  assert jax.local_device_count() >= 2
  ce = jnp.array([0.1, 0.2, 5.0, 6.0])  # The two highest on one device: both left out, not one per device.
  labels = jnp.array([0, 1, 2, 3])
  mesh = train.make_mesh(jax.local_devices()[:2])
  sharded = [jax.device_put(x, train.batch_sharding(mesh)) for x in (ce, labels)]
  loss = jax.jit(abl.SmallLoss(0.5, label_cap=1.0), out_shardings=train.replicated(mesh))(*sharded)
  assert float(loss) == pytest.approx(0.15, rel=1e-6)


def test_neg_ce_loss_is_negative_mean_ce():
  assert abl.neg_ce_loss(jnp.array([1.0, 3.0])) == pytest.approx(-2.0)


def test_isolation_loss_by_name():
  assert abl.isolation_loss("lga", 0.5)(jnp.array([0.1])) == pytest.approx(-0.1)
  with pytest.raises(ValueError, match=r"config\.abl\.loss='x' is unknown; allowed: lga, flooding"):
    abl.isolation_loss("x", 0.5)


def test_isolate_picks_lowest_losses_in_order():
  scores = np.array([0.9, 0.01, 0.5, 0.001, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4])
  np.testing.assert_array_equal(abl.isolate(scores, 0.2), [3, 1])
  np.testing.assert_array_equal(abl.isolate(scores, 0.35), [3, 1, 5])  # int(10 * 0.35) = 3


def test_isolate_breaks_ties_by_index():
  np.testing.assert_array_equal(abl.isolate(np.zeros(10), 0.3), [0, 1, 2])


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
def test_isolation_ratio_out_of_range(ratio):
  with pytest.raises(ValueError, match=r"config\.abl\.isolation_ratio=.* must be in \(0, 1\)"):
    abl.isolate(np.zeros(10), ratio)


def test_isolation_ratio_selecting_nothing():
  with pytest.raises(ValueError, match=r"config\.abl\.isolation_ratio=0\.01 isolates 0 of 50"):
    abl.isolate(np.zeros(50), 0.01)


def test_isolation_metrics_against_ground_truth():
  mask = np.zeros(10, bool)
  mask[[1, 3, 7, 8]] = True
  m = evaluate.isolation_metrics(np.array([3, 1, 5]), mask)
  assert (m["num_poisoned_isolated"], m["precision"], m["recall"]) == (2, pytest.approx(2 / 3), 0.5)
