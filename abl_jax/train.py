"""The trainer: TrainState, pmapped train/eval steps, and one epoch loop shared by every phase.

    state = create_train_state(model, tx, key, image_shape)
    step = make_train_step(model, abl.cross_entropy_loss, mean, std, augment=True)
    state = run_epoch(step, replicate(state), images, labels, order, batch_size, aug_key, ...)

Phases (baseline training, ABL isolation, fine-tuning, unlearning) differ only by loss function,
data, optimizer schedule and augmentation; they all use `make_train_step`.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import jax_utils
from flax.training import train_state

from abl_jax import distributed
from abl_jax.abl import LossFn

AXIS = "batch"  # The pmap axis: gradients, metrics and BatchNorm statistics are averaged over it.


class TrainState(train_state.TrainState):
  """Flax TrainState carrying BatchNorm statistics."""
  batch_stats: Any = None


def sgd(schedule: optax.Schedule | float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch-style SGD: L2 weight decay added to the gradient, then momentum."""
  if not callable(schedule):  # Always a schedule, so every phase's optimizer state has one structure.
    schedule = optax.constant_schedule(schedule)
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_variables(model: flax.linen.Module, key: jax.Array, image_shape: tuple[int, ...]) -> Any:
  # One compilation per (model, image shape) in a process: modules compare by their fields. A jit of a fresh
  # lambda per call compiled again every time (6-8 s for the small CNN on an idle 2-core CPU).
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: Sequence[int]) -> TrainState:
  """Initialises parameters and BatchNorm statistics for images of `image_shape` (H, W, C)."""
  variables = _init_variables(model, key, tuple(image_shape))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def with_optimizer(state: TrainState, tx: optax.GradientTransformation) -> TrainState:
  """The same weights with a fresh optimizer `tx` and step 0 (the start of a new phase)."""
  return state.replace(tx=tx, opt_state=tx.init(state.params), step=jnp.zeros_like(state.step))


def preprocess(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 0..255 -> normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(images: jax.Array, keys: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero-padding by `pad`, and random horizontal flip; one key per image."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(img, key):
    k_crop, k_flip = jax.random.split(key)
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
    crop = jax.lax.dynamic_slice(img, (dy, dx, 0), (h, w, img.shape[-1]))
    return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

  del n
  return jax.vmap(one)(padded, keys)


def make_train_step(model: flax.linen.Module, loss_fn: LossFn, mean: Sequence[float], std: Sequence[float],
                    *, augment_data: bool, bn_train: bool = True, devices: Sequence[Any] | None = None) -> Callable:
  """A pmapped step (state, images uint8, labels, key) -> (state, metrics); metrics stay on device."""

  def step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    local = images.shape[0]
    if augment_data:
      # Keys by global example position, so the augmentation does not depend on the device count.
      first = jax.lax.axis_index(AXIS) * local
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(local))
      images = augment(images, keys)
    x = preprocess(images, mean, std)

    def loss_of(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      if bn_train:
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
      else:
        logits, batch_stats = model.apply(variables, x, train=False), state.batch_stats
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss_fn(ce, AXIS), (logits, ce, batch_stats)

    (loss, (logits, ce, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        "loss": loss,
        "ce": jnp.mean(ce),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
    }
    return new_state, jax.lax.pmean(metrics, AXIS)

  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,), devices=devices)


def make_eval_step(model: flax.linen.Module, mean: Sequence[float], std: Sequence[float]) -> Callable:
  """A pmapped step (state, images uint8, labels) -> (per-example cross-entropy, predictions)."""

  def step(state: TrainState, images: jax.Array, labels: jax.Array):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = model.apply(variables, preprocess(images, mean, std), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), jnp.argmax(logits, -1)

  return jax.pmap(step, axis_name=AXIS)


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """A copy of `tree` on every local device (leading device axis)."""
  return jax_utils.replicate(tree, devices=devices)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree."""
  # flax's unreplicate keeps the device axis when there is a single device.
  return jax.tree.map(lambda x: x[0], tree)


def shard(x: np.ndarray, num_devices: int) -> np.ndarray:
  """[B, ...] -> [devices, B / devices, ...]."""
  return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])


def local_batch(x: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch, split over its local devices: [local devices, B / devices, ...]."""
  return shard(x[distributed.rows(len(x))], jax.local_device_count())


def check_batch_size(batch_size: int, field: str) -> None:
  """A global batch must split evenly over all devices (of every process)."""
  n = jax.device_count()
  if batch_size < 1 or batch_size % n:
    where = f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
    raise ValueError(f"{field}={batch_size} must be a positive multiple of the {n} devices{where}")


def epoch_order(num_examples: int, batch_size: int, key: jax.Array) -> np.ndarray:
  """A shuffled order covering every example at least once, in whole batches (wrapping around)."""
  perm = np.asarray(jax.random.permutation(key, num_examples))
  steps = math.ceil(num_examples / batch_size)
  return np.resize(perm, steps * batch_size).reshape(steps, batch_size)


def _prefetch(images: np.ndarray, labels: np.ndarray, order: np.ndarray) -> Iterator:
  n, mine = jax.local_device_count(), distributed.rows(order.shape[1])
  batches = ((shard(images[idx], n), shard(labels[idx], n)) for idx in order[:, mine])
  return jax_utils.prefetch_to_device(batches, 2)


def run_epoch(step_fn: Callable, state: TrainState, images: np.ndarray, labels: np.ndarray, order: np.ndarray,
              key: jax.Array, *, log_every: int, describe: str, eta_steps_after: int = 0,
              on_log: Callable[[dict[str, float]], None] | None = None) -> tuple[TrainState, dict[str, float]]:
  """One epoch over `order` (a [steps, batch] index array) with a replicated state.

  Each process feeds its local devices its rows of every global batch (`distributed.rows`).

  Logs loss, images/s and an ETA every `log_every` steps; raises FloatingPointError on a NaN loss.
  The summary adds images/s and data_wait_share, the share of the epoch spent waiting for the next batch.
  `eta_steps_after` is the number of steps still to come after this epoch (for the ETA).
  """
  steps, batch = order.shape
  pending, logged = [], []
  t0 = time.perf_counter()
  tick, tick_step = t0, 0
  batches, waited = _prefetch(images, labels, order), 0.0
  for i in range(steps):
    t_wait = time.perf_counter()
    x, y = next(batches)  # Host time not spent dispatching steps: gathering, sharding, copying to device.
    waited += time.perf_counter() - t_wait
    step_key = jax.random.fold_in(key, i)
    state, metrics = step_fn(state, x, y, replicate(step_key))
    pending.append(metrics)
    if i == 0:  # The first step includes compilation: start the rate clock after it.
      jax.block_until_ready(metrics)
      tick, tick_step = time.perf_counter(), 1
    if (i + 1) % log_every == 0 or i + 1 == steps:
      fetched = [jax.tree.map(lambda m: float(m[0]), m) for m in jax.device_get(pending)]
      pending = []
      mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      if not all(math.isfinite(v) for v in mean.values()):
        raise FloatingPointError(f"{describe}: loss became {mean['loss']} at step {i + 1}; "
                                 "lower the phase's learning rate or check the data")
      now = time.perf_counter()
      rate = (i + 1 - tick_step) * batch / (now - tick) if i + 1 > tick_step else batch / (now - t0)
      eta = (steps - i - 1 + eta_steps_after) * batch / max(rate, 1e-9)
      logging.info("%s step %d/%d loss %.4f ce %.4f acc %.3f | %.0f img/s, ETA %s", describe, i + 1, steps,
                   mean["loss"], mean["ce"], mean["accuracy"], rate, _hms(eta))
      tick, tick_step = now, i + 1
      logged.append((len(fetched), mean))
      if on_log:
        on_log({"step": i + 1, "images_per_s": rate, **mean})
  total = sum(n for n, _ in logged)
  summary = {k: sum(n * m[k] for n, m in logged) / total for k in logged[0][1]}
  seconds = max(time.perf_counter() - t0, 1e-9)
  summary["images_per_s"] = steps * batch / seconds
  summary["data_wait_share"] = waited / seconds
  return state, summary


def predict(eval_fn: Callable, state: TrainState, images: np.ndarray, labels: np.ndarray,
            batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-example cross-entropy and predicted class for a whole set, in large pmapped batches.

  Each process scores its rows of every batch; every process receives the whole set's results.
  """
  total = len(images)
  pad = (-total) % batch_size
  if pad:  # Pad the last batch so that every call has one shape (one compilation).
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  losses, preds = [], []
  for start in range(0, len(images), batch_size):
    sl = slice(start, start + batch_size)
    ce, pred = eval_fn(state, local_batch(images[sl]), local_batch(labels[sl]))
    losses.append(ce.reshape(-1))
    preds.append(pred.reshape(-1))
  losses, preds = jax.device_get((losses, preds))
  losses, preds = distributed.gather_batches(np.stack(losses)), distributed.gather_batches(np.stack(preds))
  return losses[:total], preds[:total]


def _hms(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
