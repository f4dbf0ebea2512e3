"""Anti-Backdoor Learning: the isolation losses, per-example isolation, and the unlearning loss.

    loss = lga_loss(ce, gamma=0.5, axis_name="batch")   # inside a pmapped step
    picked = isolate(scores, ratio=0.01)                  # lowest-loss 1%: suspected backdoor examples

Every function here sees losses, images and labels only, never the ground-truth poison mask.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ISOLATION_LOSSES = ("lga", "flooding")
UNLEARNING_MODES = ("ascent", "joint")
UNLEARNING_LOSSES = ("neg_ce", "complement")
UNLEARNING_BN = ("train", "frozen")
STOP_RULES = ("none", "isolated_accuracy")

# A loss function maps per-example cross-entropy [B] (this device's shard) to a scalar.
LossFn = Callable[[jax.Array, "str | None"], jax.Array]


def _global_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean over the whole (possibly device-split) batch, with no gradient."""
  m = jax.lax.stop_gradient(jnp.mean(x))
  return jax.lax.pmean(m, axis_name) if axis_name else m


def cross_entropy_loss(ce: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Ordinary training: the batch-mean cross-entropy."""
  del axis_name
  return jnp.mean(ce)


def lga_loss(ce: jax.Array, gamma: float, axis_name: str | None = None) -> jax.Array:
  """Local gradient ascent: sign(CE - gamma) * CE on the batch-mean cross-entropy."""
  # The sign uses the global batch mean, so a device-split batch takes the same step as one device.
  sign = jnp.sign(_global_mean(ce, axis_name) - gamma)
  return sign * jnp.mean(ce)


def flooding_loss(ce: jax.Array, gamma: float, axis_name: str | None = None) -> jax.Array:
  """Flooding: |CE - gamma| + gamma on the batch-mean cross-entropy (same gradient as LGA)."""
  sign = jnp.sign(_global_mean(ce, axis_name) - gamma)
  return sign * (jnp.mean(ce) - gamma) + gamma


def unlearning_loss(ce: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Gradient ascent on the isolated examples: minimise -CE."""
  del axis_name
  return -jnp.mean(ce)


def complement_loss(ce: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Unlearning by the complement: minimise -log(1 - p(label)), i.e. push p(label) to 0 and stop there."""
  del axis_name
  # -CE's gradient vanishes on confidently learned examples (p -> 1) and grows without bound once they
  # are unlearned; this one is largest at p -> 1 and fades as p -> 0. 1 - p = -expm1(-ce), exactly.
  return -jnp.mean(jnp.log(-jnp.expm1(-jnp.maximum(ce, 1e-12))))


def _forget(loss: str) -> Callable[[jax.Array], jax.Array]:
  if loss == "neg_ce":
    return unlearning_loss
  if loss == "complement":
    return complement_loss
  raise ValueError(f"config.abl.unlearning_loss={loss!r} is unknown; allowed: {', '.join(UNLEARNING_LOSSES)}")


def joint_unlearning_loss(ce: jax.Array, num_isolated: int, weight: float, axis_name: str | None = None,
                          forget: Callable[[jax.Array], jax.Array] = unlearning_loss) -> jax.Array:
  """Joint unlearning: `forget` the first `num_isolated` examples, descend CE (x weight) on the rest."""
  del axis_name
  return forget(ce[:num_isolated]) + weight * jnp.mean(ce[num_isolated:])


def unlearning_step_loss(mode: str, num_isolated_per_device: int, weight: float, loss: str = "neg_ce") -> LossFn:
  """The unlearning loss of `config.abl.unlearning_mode` and `unlearning_loss` (joint: isolated first)."""
  forget = _forget(loss)
  if mode == "ascent":
    return lambda ce, axis_name=None: forget(ce)
  if mode == "joint":
    return lambda ce, axis_name=None: joint_unlearning_loss(ce, num_isolated_per_device, weight, axis_name, forget)
  raise ValueError(f"config.abl.unlearning_mode={mode!r} is unknown; allowed: {', '.join(UNLEARNING_MODES)}")


def stop_unlearning(isolated_predictions: np.ndarray, isolated_labels: np.ndarray, rule: str,
                    threshold: float) -> bool:
  """The defender's stopping rule: true once the model has unlearned the isolated examples' labels.

  It sees the isolated examples' predictions and (training) labels only, nothing about the truth.
  """
  if rule == "none":
    return False
  if rule == "isolated_accuracy":
    return bool(np.mean(np.asarray(isolated_predictions) == np.asarray(isolated_labels)) <= threshold)
  raise ValueError(f"config.abl.unlearning_stop={rule!r} is unknown; allowed: {', '.join(STOP_RULES)}")


def isolation_loss(name: str, gamma: float) -> LossFn:
  """The isolation-phase loss named by `config.abl.loss`."""
  if name == "lga":
    return lambda ce, axis_name=None: lga_loss(ce, gamma, axis_name)
  if name == "flooding":
    return lambda ce, axis_name=None: flooding_loss(ce, gamma, axis_name)
  raise ValueError(f"config.abl.loss={name!r} is unknown; allowed: {', '.join(ISOLATION_LOSSES)}")


def num_isolated(num_examples: int, ratio: float) -> int:
  """How many examples `ratio` isolates out of `num_examples` (the authors' int(n * ratio))."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"config.abl.isolation_ratio={ratio} must be in (0, 1)")
  k = int(num_examples * ratio)
  if k < 1:
    raise ValueError(f"config.abl.isolation_ratio={ratio} isolates 0 of {num_examples} training examples; "
                     f"use a ratio of at least {1.0 / num_examples:.2g}")
  return k


def isolate(scores: np.ndarray, ratio: float) -> np.ndarray:
  """Indices of the `ratio` lowest-scoring examples, lowest first (ties broken by index)."""
  k = num_isolated(len(scores), ratio)
  return np.argsort(np.asarray(scores), kind="stable")[:k].astype(np.int64)
