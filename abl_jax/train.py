"""The trainer: TrainState, data-parallel train and predict steps, and one epoch loop shared by every phase.

    mesh = train.make_mesh()                        # every device of every process, one batch axis
    state = train.replicate(create_train_state(model, tx, key, image_shape), mesh)
    step = make_train_step(model, abl.cross_entropy_loss, mean, std, momentum=0.9, weight_decay=5e-4,
                           augment_data=True, mesh=mesh)
    state, summary = run_epoch(step, state, images, labels, order, key, learning_rate=schedule, log_every=50,
                               describe="epoch 1")
    ce, pred = predictor(model, variables_of(state), mean, std, batch_size=500)(images, labels)

Data parallelism lives here alone. Every step is one `jax.jit` over a `Mesh` of all devices: batches are
sharded along the mesh's batch axis and everything else (parameters, optimizer state, BatchNorm statistics,
PRNG keys, metrics) is replicated. Losses, models and metrics are written for the whole global batch; XLA
inserts the cross-device reductions (gradients, batch means, BatchNorm statistics), so any device count
computes what one device does. In a multi-process run each process feeds its rows of every global batch
(`jax.make_array_from_process_local_data`) and receives replicated results.
"""
from __future__ import annotations

import collections
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
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "batch"  # The mesh axis that batches are split along.

from abl_jax.abl import LossFn, SmallLoss

# (uint8 images [N, H, W, C], labels [N]) -> (per-example cross-entropy [N], predicted class [N]), on the host.
Predict = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class TrainState(train_state.TrainState):
  """Flax TrainState carrying BatchNorm statistics."""
  batch_stats: Any = None


def sgd(schedule: optax.Schedule | float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch-style SGD: L2 weight decay added to the gradient, then momentum."""
  if not callable(schedule):
    return _constant_sgd(float(schedule), float(momentum), float(weight_decay))
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


@functools.lru_cache(maxsize=16)
def _constant_sgd(lr: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  # Always a schedule, so every phase's optimizer state has one structure; one object per rate, so train states
  # (the optimizer is part of their static structure) of different runs reuse the steps compiled for them.
  return sgd(optax.constant_schedule(lr), momentum, weight_decay)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_variables(model: flax.linen.Module, key: jax.Array, image_shape: tuple[int, ...]) -> Any:
  # One compilation per (model, image shape) in a process: modules compare by their fields. A jit of a fresh
  # lambda per call compiled again every time (6-8 s for the small CNN on an idle 2-core CPU).
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: Sequence[int]) -> TrainState:
  """Initialises parameters and BatchNorm statistics for images of `image_shape` (H, W, C)."""
  variables = _init_variables(model, key, tuple(image_shape))
  # No apply_fn: the steps hold the model, and a bound method (a new one per model object) would make every
  # run's state a new static structure to compile steps for.
  return TrainState.create(apply_fn=None, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def with_optimizer(state: TrainState, tx: optax.GradientTransformation) -> TrainState:
  """The same weights with a fresh optimizer `tx` and step 0 (the start of a new phase)."""
  return state.replace(tx=tx, opt_state=tx.init(state.params), step=jnp.zeros_like(state.step))


def variables_of(state: TrainState, logit_offset: np.ndarray | None = None) -> dict[str, Any]:
  """The model variables ({'params', 'batch_stats'}) of a train state; with `logit_offset`, also the offsets
  `predictor` adds to every logit ([classes]; config.abl.calibrate_flagged)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if logit_offset is not None:
    variables[LOGIT_OFFSET] = np.asarray(logit_offset, np.float32)
  return variables


LOGIT_OFFSET = "logit_offset"  # The variables' key of offsets added to the model's logits at inference.


# --- The device mesh, and moving arrays onto it and back. -------------------------------------------------


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A one-axis mesh over `devices` (default: every device of every process)."""
  return Mesh(np.asarray(list(devices) if devices is not None else jax.devices()), (BATCH,))


@functools.lru_cache(maxsize=None)
def _default_mesh(devices: tuple[Any, ...]) -> Mesh:
  return make_mesh(devices)


def default_mesh() -> Mesh:
  """The mesh of every device of every process (built once)."""
  return _default_mesh(tuple(jax.devices()))


def replicated(mesh: Mesh | None = None) -> NamedSharding:
  """The sharding of a value every device holds whole."""
  return NamedSharding(mesh or default_mesh(), PartitionSpec())


def batch_sharding(mesh: Mesh | None = None) -> NamedSharding:
  """The sharding of a batch split along its first axis over the mesh."""
  return NamedSharding(mesh or default_mesh(), PartitionSpec(BATCH))


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """`tree` (host or device values, the same on every process) placed whole on every device of `mesh`."""
  sharding = replicated(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: jax.make_array_from_callback(
      np.shape(a), sharding, lambda index, a=np.asarray(a): a[index]), tree)


def local_rows(batch: int, mesh: Mesh | None = None) -> slice:
  """The rows of a global batch of `batch` rows that this process's devices hold."""
  index = batch_sharding(mesh).addressable_devices_indices_map((batch,)).values()
  starts = [i[0].start or 0 for i in index]
  stops = [batch if i[0].stop is None else i[0].stop for i in index]
  return slice(min(starts), max(stops))


def put_batch(x: np.ndarray, mesh: Mesh | None = None, *, rows: np.ndarray | None = None) -> jax.Array:
  """A global batch sharded over `mesh`; each process supplies only its own rows.

  `x` is the whole global batch, or, with `rows`, the array that `rows` (the batch's indices) index into,
  so that a process gathers only the rows it feeds.
  """
  sharding = batch_sharding(mesh)
  batch = len(x) if rows is None else len(rows)
  mine = slice(None) if sharding.is_fully_addressable else local_rows(batch, mesh)
  local = x[mine] if rows is None else x[rows[mine]]
  if sharding.is_fully_addressable:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, (batch, *local.shape[1:]))


def _whole(a: Any) -> Any:
  """A value this process can fetch whole: the array itself, its local replica, or a gather over processes."""
  if not isinstance(a, jax.Array) or a.is_fully_addressable:
    return a
  if a.sharding.is_fully_replicated:
    return a.addressable_data(0)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(a, tiled=True)


def to_host(tree: Any) -> Any:
  """Host (numpy) copies of device values, whole on every process (batch-split ones gathered)."""
  return jax.device_get(jax.tree.map(_whole, tree))


def check_batch_size(batch_size: int, field: str, mesh: Mesh | None = None) -> None:
  """A global batch must split evenly over all devices (of every process)."""
  n = (mesh or default_mesh()).size
  if batch_size < 1 or batch_size % n:
    where = f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
    raise ValueError(f"{field}={batch_size} must be a positive multiple of the {n} devices{where}")


def data_parallel(fn: Callable, mesh: Mesh | None, batch_args: Sequence[int], num_args: int, *,
                  batch_outputs: bool = False, donate_argnums: Sequence[int] = ()) -> Callable:
  """`fn` jitted over `mesh`: the arguments at `batch_args` split along the batch axis, the rest replicated.

  Outputs are replicated, or split along the batch axis like the inputs when `batch_outputs`.
  """
  in_shardings = tuple(batch_sharding(mesh) if i in batch_args else replicated(mesh) for i in range(num_args))
  out = batch_sharding(mesh) if batch_outputs else replicated(mesh)
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out, donate_argnums=tuple(donate_argnums))


# --- Steps. --------------------------------------------------------------------------------------------------


def normalise(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Images as [0, 1] floats -> normalised per channel."""
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def preprocess(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 0..255 (or floats on that scale) -> normalised float32."""
  return normalise(images.astype(jnp.float32) / 255.0, mean, std)


def augment(images: jax.Array, keys: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero-padding by `pad`, and random horizontal flip; one key per image."""
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(img, key):
    k_crop, k_flip = jax.random.split(key)
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
    crop = jax.lax.dynamic_slice(img, (dy, dx, 0), (h, w, img.shape[-1]))
    return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

  return jax.vmap(one)(padded, keys)


def mix(images: jax.Array, keys: jax.Array, mode: str, alpha: float) -> tuple[jax.Array, jax.Array]:
  """Each image mixed with the next one in the batch (the last with the first), one key per image: "cutmix" pastes
  a box of the partner's (side sqrt(1 - lam) of the image's, centre uniform, clipped at the border), "mixup" blends
  lam * image + (1 - lam) * partner, lam ~ Beta(alpha, alpha). Returns the images (float32 on the input's scale)
  and each one's own share lam of the loss (cutmix: the share of its pixels left); the partner's share is 1 - lam.
  """
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  partner = jnp.roll(x, -1, axis=0)

  def one(img, other, key):
    k_lam, k_y, k_x = jax.random.split(key, 3)
    lam = jax.random.beta(k_lam, alpha, alpha)
    if mode == "mixup":
      return lam * img + (1 - lam) * other, lam
    side = jnp.sqrt(1 - lam)
    bh, bw = jnp.round(h * side).astype(jnp.int32), jnp.round(w * side).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - bh // 2, 0, h), jnp.clip(cy - bh // 2 + bh, 0, h)
    x0, x1 = jnp.clip(cx - bw // 2, 0, w), jnp.clip(cx - bw // 2 + bw, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return jnp.where(box[..., None], other, img), 1 - jnp.mean(box)

  if mode not in ("cutmix", "mixup"):
    raise ValueError(f"mix mode {mode!r} is unknown; allowed: cutmix, mixup")
  return jax.vmap(one)(x, partner, keys)


def add_triggers(images: jax.Array, labels: jax.Array, triggers: jax.Array, share: float,
                 keys: jax.Array, scale: tuple[float, float] = (1.0, 1.0)) -> jax.Array:
  """Each image, with probability `share` (one key per image), plus the trigger of a class other than its label
  drawn uniformly (`triggers` [classes, H, W, C], pixel units; or [k, classes, H, W, C], k candidates per class, one
  drawn uniformly) times a factor drawn uniformly from `scale` (low, high), clipped to 0..255 and rounded; float32."""
  classes = triggers.shape[-4]
  low, high = (float(s) for s in scale)

  def one(img, label, key):
    k_apply, k_class = jax.random.split(key)
    other = (label + jax.random.randint(k_class, (), 1, classes)) % classes
    # The factor's key is folded from the image's, so that a fixed factor leaves the other draws as they were.
    factor = jax.random.uniform(jax.random.fold_in(key, 7), (), minval=low, maxval=high) if high > low else low
    if triggers.ndim == 5:
      trigger = triggers[jax.random.randint(jax.random.fold_in(key, 11), (), 0, triggers.shape[0]), other]
    else:
      trigger = triggers[other]
    moved = jnp.round(jnp.clip(img.astype(jnp.float32) + factor * trigger, 0, 255))
    return jnp.where(jax.random.bernoulli(k_apply, share), moved, img.astype(jnp.float32))

  return jax.vmap(one)(images, labels, keys)


def example_keys(key: jax.Array, n: int, start: jax.Array | int = 0) -> jax.Array:
  """One key per example of a batch: fold_in(key, position), so that no key depends on the device count."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(n))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy against labels (classes, or [.., classes] probabilities) smoothed to
  (1 - s) * targets + s / num_classes."""
  soft = labels.ndim == logits.ndim
  if not label_smoothing:
    if soft:
      return optax.softmax_cross_entropy(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = labels if soft else jax.nn.one_hot(labels, logits.shape[-1])
  return optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, label_smoothing))


def hard_labels(labels: jax.Array, logits: jax.Array) -> jax.Array:
  """The classes of `labels`: themselves, or the most likely class of probability targets."""
  return jnp.argmax(labels, -1) if labels.ndim == logits.ndim else labels


def learning_rates(schedule: optax.Schedule | float, first: int, steps: int) -> np.ndarray:
  """`schedule`'s rates (float32) for the optimizer counts first .. first + steps - 1, computed on the host CPU."""
  if not callable(schedule):
    return np.full(steps, schedule, np.float32)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    rates = schedule(np.arange(first, first + steps))
  return np.broadcast_to(np.asarray(rates, np.float32), (steps,))


def apply_gradients(state: TrainState, grads: Any, lr: jax.Array, batch_stats: Any, momentum: float,
                    weight_decay: float) -> TrainState:
  """`state` after one `sgd` update at learning rate `lr`, with new BatchNorm statistics."""
  updates, opt_state = sgd(1.0, momentum, weight_decay).update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: u * lr.astype(u.dtype), updates)  # Equals sgd(lr)'s update: x * 1.0 is exact.
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                       batch_stats=batch_stats)


def make_train_step(model: flax.linen.Module, loss_fn: LossFn, mean: Sequence[float], std: Sequence[float],
                    *, momentum: float, weight_decay: float, augment_data: bool, bn_train: bool = True,
                    label_smoothing: float = 0.0, mix_mode: str = "none", mix_alpha: float = 1.0,
                    triggers: np.ndarray | None = None, trigger_share: float = 0.0,
                    trigger_scale: tuple[float, float] = (1.0, 1.0), mesh: Mesh | None = None) -> Callable:
  """A data-parallel step (state, images uint8, labels, key, learning rate) -> (state, metrics); metrics stay on
  device. It updates the weights by `sgd` with `momentum` and `weight_decay` (the state's optimizer state has its
  structure; `state.tx` is not used): the rate is an argument, so one compilation serves every schedule.

  `loss_fn` receives the per-example cross-entropy with `label_smoothing`; the metric `ce` is the plain one.
  `mix_mode` ("cutmix", "mixup"; see `mix`) mixes each augmented image with the next in the batch, and its
  cross-entropy with that one's label by their shares. `triggers` ([[k,] classes, H, W, C], pixel units): each image,
  with probability `trigger_share`, first gets another class's one added (`add_triggers`; times a factor drawn from
  `trigger_scale`), keeping its label.
  """
  settings = (model, loss_fn, tuple(mean), tuple(std), float(momentum), float(weight_decay), bool(augment_data),
              bool(bn_train), float(label_smoothing), mix_mode, float(mix_alpha), float(trigger_share),
              tuple(trigger_scale), mesh)
  with_bank = triggers is not None and bool(trigger_share)
  try:
    step = _cached_train_step(*settings, with_bank)
  except TypeError:  # An unhashable setting (a model holding arrays): a step of its own.
    step = _train_step(*settings, with_bank)
  if not with_bank:
    return step
  # The bank is an argument, not a constant of the program: runs with other triggers reuse the compiled step.
  bank = replicate(np.asarray(triggers, np.float32), mesh)
  return lambda state, images, labels, key, lr: step(state, images, labels, key, lr, bank)


def _train_step(model, loss_fn, mean, std, momentum, weight_decay, augment_data, bn_train, label_smoothing, mix_mode,
                mix_alpha, trigger_share, trigger_scale, mesh, with_bank=False) -> Callable:

  def step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, lr: jax.Array,
           bank: jax.Array | None = None):
    if bank is not None:
      images = add_triggers(images, jnp.argmax(labels, -1) if labels.ndim == 2 else labels, bank,
                            trigger_share, example_keys(jax.random.fold_in(key, 2), images.shape[0]), trigger_scale)
    if augment_data:
      images = augment(images, example_keys(key, images.shape[0]))
    if mix_mode != "none":
      images, lam = mix(images, example_keys(jax.random.fold_in(key, 1), images.shape[0]), mix_mode, mix_alpha)
    x = preprocess(images, mean, std)

    def mixed_ce(logits, smoothing=0.0):
      own = cross_entropy(logits, labels, smoothing)
      if mix_mode == "none":
        return own
      return lam * own + (1 - lam) * cross_entropy(logits, jnp.roll(labels, -1, axis=0), smoothing)

    def loss_of(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      if bn_train:
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
      else:
        logits, batch_stats = model.apply(variables, x, train=False), state.batch_stats
      ce = mixed_ce(logits)
      smoothed = mixed_ce(logits, label_smoothing) if label_smoothing else ce
      if isinstance(loss_fn, SmallLoss):
        return loss_fn(smoothed, hard_labels(labels, logits)), (logits, ce, batch_stats)
      return loss_fn(smoothed), (logits, ce, batch_stats)

    (loss, (logits, ce, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, lr, batch_stats, momentum, weight_decay)
    metrics = {
        "loss": loss,
        "ce": jnp.mean(ce),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == hard_labels(labels, logits)),
    }
    return new_state, metrics

  return data_parallel(step, mesh, batch_args=(1, 2), num_args=6 if with_bank else 5, donate_argnums=(0,))


# One step per settings in a process: the runs of one process (tests, sweeps) reuse its tracing and compilation.
_cached_train_step = functools.lru_cache(maxsize=64)(_train_step)


@functools.lru_cache(maxsize=32)
def _infer_step(model: flax.linen.Module, mean: tuple[float, ...], std: tuple[float, ...], mesh: Mesh,
                features: bool = False) -> Callable:
  """(variables, images, labels) -> (per-example cross-entropy, predictions, class probabilities[, the input of
  the model's last Dense layer]): one compilation per batch shape."""

  def infer(variables, images, labels):
    seen = []
    variables = dict(variables)
    offset = variables.pop(LOGIT_OFFSET, None)

    def keep_dense_input(next_fun, args, kwargs, context):
      if isinstance(context.module, flax.linen.Dense) and context.method_name == "__call__":
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    if features:
      with flax.linen.intercept_methods(keep_dense_input):
        logits = model.apply(variables, preprocess(images, mean, std), train=False)
    else:
      logits = model.apply(variables, preprocess(images, mean, std), train=False)
    if offset is not None:
      logits = logits + offset.astype(logits.dtype)
    out = (optax.softmax_cross_entropy_with_integer_labels(logits, labels), jnp.argmax(logits, -1),
           jax.nn.softmax(logits.astype(jnp.float32)))
    return out + ((seen[-1].astype(jnp.float32),) if features else ())

  # Outputs stay split over the devices: a replicated output would end each call in an all-gather, and on CPU
  # devices the back-to-back independent calls of `predictor` can then deadlock the intra-op thread pool.
  return data_parallel(infer, mesh, batch_args=(1, 2), num_args=3, batch_outputs=True)


def predictor(model: flax.linen.Module, variables: Any, mean: Sequence[float], std: Sequence[float],
              batch_size: int, mesh: Mesh | None = None, probabilities: bool = False,
              features: bool = False) -> Predict:
  """The (images, labels) -> (cross-entropy, predicted class) function of `model` with `variables` (inference mode);
  with `probabilities`, also every class's probability ([N, classes]); with `features`, last, the input of the
  model's last Dense layer ([N, width], the penultimate features).

  Whole sets go through in batches of `batch_size` split over `mesh` (padded to one shape); every process
  receives the whole result. A process drawing pictures alone passes a mesh of its local devices.
  """
  mesh = mesh or default_mesh()
  check_batch_size(batch_size, "eval batch size", mesh)
  fn = _infer_step(model, tuple(float(m) for m in mean), tuple(float(s) for s in std), mesh, features)
  placed = replicate(variables, mesh)

  def predict(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = len(images)
    size = min(batch_size, -(-total // mesh.size) * mesh.size) or mesh.size  # Small sets: one small batch.
    pad = (-total) % size
    if pad:  # Pad the last batch so that every call has one shape (one compilation).
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    outputs = [fn(placed, put_batch(images[s:s + size], mesh), put_batch(labels[s:s + size], mesh))
               for s in range(0, len(images), size)]
    if not outputs:
      return (np.zeros(0), np.zeros(0, int)) + ((np.zeros((0, 0)),) * (probabilities + features))
    ce, pred, probs, *feats = (np.concatenate(x) for x in zip(*to_host(outputs)))
    return ((ce[:total], pred[:total]) + ((probs[:total],) if probabilities else ())
            + ((feats[0][:total],) if features else ()))

  return predict


def epoch_order(num_examples: int, batch_size: int, key: jax.Array, steps: int | None = None) -> np.ndarray:
  """A shuffled order in whole batches (wrapping around): every example at least once where `steps` is the
  default, as many as the examples take."""
  perm = np.asarray(jax.random.permutation(key, num_examples))
  steps = math.ceil(num_examples / batch_size) if steps is None else steps
  return np.resize(perm, steps * batch_size).reshape(steps, batch_size)


def balanced_order(labels: np.ndarray, batch_size: int, key: jax.Array, steps: int | None = None) -> np.ndarray:
  """[steps, batch] positions into `labels`, drawn with replacement so that every label is equally likely (steps:
  as many as `labels` takes, by default)."""
  labels = np.asarray(labels)
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  p = 1.0 / (len(counts) * counts[inverse])
  steps = math.ceil(len(labels) / batch_size) if steps is None else steps
  picks = jax.random.choice(key, len(labels), (steps * batch_size,), replace=True, p=jnp.asarray(p / p.sum()))
  return np.asarray(picks, np.int64).reshape(steps, batch_size)


def device_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, mesh: Mesh | None = None,
                   ahead: int = 2) -> Iterator[tuple[jax.Array, jax.Array]]:
  """The batches `order` ([steps, batch] indices) picks, put on the mesh `ahead` steps before they are used."""
  queue: collections.deque = collections.deque()
  for idx in order:
    queue.append((put_batch(images, mesh, rows=idx), put_batch(labels, mesh, rows=idx)))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def run_epoch(step_fn: Callable, state: TrainState, images: np.ndarray, labels: np.ndarray, order: np.ndarray,
              key: jax.Array, *, log_every: int, describe: str,
              learning_rate: optax.Schedule | float | None = None, eta_steps_after: int = 0,
              on_log: Callable[[dict[str, float]], None] | None = None,
              mesh: Mesh | None = None) -> tuple[TrainState, dict[str, float]]:
  """One epoch over `order` (a [steps, batch] index array) with a state replicated on `mesh`.

  A `make_train_step` step gets the rates `learning_rate` gives the optimizer's counts (the state's step:
  `with_optimizer` starts both at 0); with None, `step_fn` takes (state, images, labels, key) only.

  Logs loss, images/s and an ETA every `log_every` steps; raises FloatingPointError on a NaN loss.
  The summary adds images/s and data_wait_share, the share of the epoch spent waiting for the next batch.
  `eta_steps_after` is the number of steps still to come after this epoch (for the ETA).
  """
  steps, batch = order.shape
  rates = None if learning_rate is None else learning_rates(learning_rate, int(to_host(state.step)), steps)
  pending, logged = [], []
  t0 = time.perf_counter()
  tick, tick_step = t0, 0
  batches, waited = device_batches(images, labels, order, mesh), 0.0
  for i in range(steps):
    t_wait = time.perf_counter()
    x, y = next(batches)  # Host time not spent dispatching steps: gathering and copying to the devices.
    waited += time.perf_counter() - t_wait
    rate = () if rates is None else (replicate(rates[i], mesh),)
    state, metrics = step_fn(state, x, y, replicate(jax.random.fold_in(key, i), mesh), *rate)
    pending.append(metrics)
    if i == 0:  # The first step includes compilation: start the rate clock after it.
      jax.block_until_ready(metrics)
      tick, tick_step = time.perf_counter(), 1
    if (i + 1) % log_every == 0 or i + 1 == steps:
      fetched = [{k: float(v) for k, v in m.items()} for m in to_host(pending)]
      pending = []
      mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      if not all(math.isfinite(v) for v in mean.values()):
        raise FloatingPointError(f"{describe}: loss became {mean['loss']} at step {i + 1}; "
                                 "lower the phase's learning rate or check the data")
      now = time.perf_counter()
      rate = (i + 1 - tick_step) * batch / (now - tick) if i + 1 > tick_step else batch / (now - t0)
      eta = (steps - i - 1 + eta_steps_after) * batch / max(rate, 1e-9)
      logging.info("%s step %d/%d %s | %.0f img/s, ETA %s", describe, i + 1, steps,
                   " ".join(f"{k} {v:.4f}" for k, v in mean.items()), rate, _hms(eta))
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


def _hms(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
