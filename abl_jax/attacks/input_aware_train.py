"""The input-aware attacker's training: the mask generator alone, then classifier + pattern generator.

    variables, meta = input_aware_train.load_or_train(config, train)   # {'pattern': ..., 'mask': ...}

Stage 1 (config.attack.input_aware.mask_epochs): M alone, loss lambda_norm * mean(relu(m - mask_density))
+ lambda_div * diversity(x1, x2, m1, m2), Adam(mask_lr, betas 0.5, 0.9), lr x0.1 at 40% and 80% of the epochs
(the reference's 10 and 20 of 25). Stage 2 (epochs): M frozen; in each batch of b pairs the first
int(p_attack * b) images become backdoor examples (their own trigger, target label), the next
int(p_cross * b) cross-trigger examples (the trigger of an image from a second batch, true label);
loss = CE over all + lambda_div * diversity(x1, x2, G(x1), G(x2)); SGD (cosine) for the classifier, Adam
(cosine, betas 0.5, 0.9) for G. Each update is one data-parallel step (train.data_parallel). Diversity distances are taken on
normalised images and patterns, as in the reference. The trained generators are cached with Orbax under
config.data.cache_dir (or ~/.cache/abl_jax) / input_aware/, keyed by a hash of their config and the data.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from abl_jax import cache, data as data_lib, distributed, models, train
from abl_jax.attacks import input_aware_trigger
from abl_jax.checkpoint import Checkpointer, save_once
from abl_jax.data import Dataset
from abl_jax.models import generator

_VERSION = 1  # Bump when training changes meaning, so that old cache entries are not reused.
_KEY_PURPOSE = 2000  # fold_in(PRNGKey(config.seed), this): apart from experiment's (0..3) and surrogate's (1000).
BETAS = (0.5, 0.9)  # The reference's Adam betas for both generators.


def distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-example root-mean-square difference [N] (square root kept finite-gradient at 0)."""
  d = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return jnp.sqrt(jnp.maximum(d, 1e-12))


def diversity_loss(x1: jax.Array, x2: jax.Array, g1: jax.Array, g2: jax.Array, eps: float = 1e-7) -> jax.Array:
  """mean_i ||x1_i - x2_i|| / (||g1_i - g2_i|| + eps): large when different inputs get similar outputs."""
  return jnp.mean(distance(x1, x2) / (distance(g1, g2) + eps))


def mask_density_loss(masks: jax.Array, density: float) -> jax.Array:
  """mean(relu(m - density)): pushes the masks' values below `density`."""
  return jnp.mean(jax.nn.relu(masks - density))


def _pairs(images: jax.Array, key: jax.Array, augment: bool) -> tuple[jax.Array, jax.Array]:
  """A [2b] uint8 batch (x1 then x2) -> two [b] float batches in [0, 1], augmented if asked."""
  n = images.shape[0]
  if augment:
    images = train.augment(images, train.example_keys(key, n))
  x = images.astype(jnp.float32) / 255.0
  return x[:n // 2], x[n // 2:]


def make_mask_step(mask_model, ia: ml_collections.ConfigDict, mean, std, *, augment: bool) -> Callable:
  """Data-parallel (mask TrainState, paired images, labels, key) -> (state, metrics): stage 1."""

  def step(state, images, labels, key):
    del labels
    p1, p2 = _pairs(images, key, augment)
    n1, n2 = train.normalise(p1, mean, std), train.normalise(p2, mean, std)

    def loss_of(params):
      # One call on both batches: BatchNorm statistics over 2b images.
      raw, upd = mask_model.apply({"params": params, "batch_stats": state.batch_stats},
                                  jnp.concatenate([n1, n2]), train=True, mutable=["batch_stats"])
      m1, m2 = jnp.split(generator.threshold(raw), 2)
      density, div = mask_density_loss(m1, ia.mask_density), diversity_loss(n1, n2, m1, m2)
      return ia.lambda_norm * density + ia.lambda_div * div, (density, div, jnp.mean(m1), upd["batch_stats"])

    (loss, (density, div, mean_mask, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=stats)
    return state, {"loss": loss, "density": density, "diversity": div, "mean_mask": mean_mask}

  return train.data_parallel(step, None, batch_args=(1, 2), num_args=4, donate_argnums=(0,))


def make_joint_step(classifier, pattern_model, mask_model, ia: ml_collections.ConfigDict, mean, std,
                    target: int, *, augment: bool) -> Callable:
  """Data-parallel ((classifier, G, M vars), paired images, labels, key) -> (state, metrics): stage 2."""

  def step(state, images, labels, key):
    cls, gen, mask_vars = state
    p1, p2 = _pairs(images, key, augment)
    y1 = labels[:labels.shape[0] // 2]
    b = p1.shape[0]
    nb, nc = int(ia.p_attack * b), int(ia.p_cross * b)
    k = min(nb, nc)  # Diversity pairs (the reference: nb == nc).
    n1, n2 = train.normalise(p1, mean, std), train.normalise(p2, mean, std)
    src = jnp.concatenate([n1[:nb], n2[nb:nb + nc]])  # Backdoor examples' own images, then cross sources.
    masks = generator.threshold(mask_model.apply(mask_vars, src, train=False))
    targets = jnp.concatenate([jnp.full((nb,), target, y1.dtype), y1[nb:]])

    def loss_of(params):
      c_params, g_params = params
      pats, g_upd = pattern_model.apply({"params": g_params, "batch_stats": gen.batch_stats}, src, train=True,
                                        mutable=["batch_stats"])
      triggered = generator.compose(p1[:nb + nc], pats, masks)  # bd: own trigger; cross: another image's.
      x = train.normalise(jnp.concatenate([triggered, p1[nb + nc:]]), mean, std)
      logits, c_upd = classifier.apply({"params": c_params, "batch_stats": cls.batch_stats}, x, train=True,
                                       mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      pn = train.normalise(pats, mean, std)
      div = diversity_loss(n1[:k], n2[nb:nb + k], pn[:k], pn[nb:nb + k])
      return jnp.mean(ce) + ia.lambda_div * div, (ce, div, logits, c_upd["batch_stats"], g_upd["batch_stats"])

    (loss, (ce, div, logits, c_stats, g_stats)), (gc, gg) = jax.value_and_grad(loss_of, has_aux=True)(
        (cls.params, gen.params))
    cls = cls.apply_gradients(grads=gc, batch_stats=c_stats)
    gen = gen.apply_gradients(grads=gg, batch_stats=g_stats)
    right = jnp.argmax(logits, -1) == targets
    metrics = {"loss": loss, "ce": jnp.mean(ce), "diversity": div, "accuracy": jnp.mean(right),
               "backdoor_accuracy": jnp.mean(right[:nb]), "cross_accuracy": jnp.mean(right[nb:nb + nc]),
               "clean_accuracy": jnp.mean(right[nb + nc:])}
    return (cls, gen, mask_vars), metrics

  return train.data_parallel(step, None, batch_args=(1, 2), num_args=4, donate_argnums=(0,))


def paired_order(num_examples: int, batch_size: int, key: jax.Array) -> np.ndarray:
  """[steps, 2 * batch]: two independent shuffles, each row the x1 batch followed by the x2 batch."""
  k1, k2 = jax.random.split(key)
  o1, o2 = (train.epoch_order(num_examples, batch_size, k) for k in (k1, k2))
  return np.concatenate([o1, o2], axis=1)


def cache_path(config: ml_collections.ConfigDict, train_set: Dataset) -> str:
  """The cache directory of the generators that `config` trains on `train_set`."""
  spec = {"input_aware": config.attack.input_aware.to_dict(), "target": config.attack.target_label,
          "classifier": classifier_spec(config), "mean": list(config.data.mean), "std": list(config.data.std),
          "seed": config.seed, "momentum": config.train.momentum, "version": _VERSION,
          "numerics": cache.numerics()}
  return cache.entry(config.data.cache_dir, "input_aware", spec, (train_set.images, train_set.labels))


def classifier_spec(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """The attacker's classifier: (model name, width); '' / 0 take config.model's."""
  ia = config.attack.input_aware
  return ia.classifier or config.model.name, ia.classifier_width or config.model.width


def init_variables(config: ml_collections.ConfigDict, image_shape: Sequence[int], key: jax.Array) -> dict:
  """Fresh {'pattern', 'mask'} generator variables for images of `image_shape` (H, W, C)."""
  g, m = input_aware_trigger.generators(config, image_shape[-1])
  x = jnp.zeros((1, *image_shape), jnp.float32)
  kg, km = jax.random.split(key)
  return {"pattern": jax.jit(lambda k: g.init(k, x, train=False))(kg),
          "mask": jax.jit(lambda k: m.init(k, x, train=False))(km)}


def load_or_train(config: ml_collections.ConfigDict, train_set: Dataset) -> tuple[dict, dict]:
  """({'pattern', 'mask'} generator variables, meta), from the cache or trained (then cached) first."""
  path = cache_path(config, train_set)
  with cache.exclusive(path):  # A parallel run wanting the same generators waits for this one and reads them.
    return _load_or_train(config, train_set, path)


def _load_or_train(config: ml_collections.ConfigDict, train_set: Dataset, path: str) -> tuple[dict, dict]:
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_PURPOSE)
  if distributed.everywhere(os.path.isdir(path)):  # Every process takes one branch: training is collective.
    ckpt = Checkpointer(path, 1)
    variables, meta = ckpt.restore(ckpt.latest(), like=init_variables(config, train_set.images.shape[1:], key))
    ckpt.close()
    logging.info("input_aware: reusing the cached generators from %s (trained in %.0f s; attacker's classifier "
                 "%s)", path, meta["seconds"], _describe(meta["attacker"]))
    return variables, meta
  ia = config.attack.input_aware
  logging.info("input_aware: no cache at %s; training the generators (mask %d epochs, then classifier %s + "
               "pattern %d epochs)", path, ia.mask_epochs, "/".join(map(str, classifier_spec(config))), ia.epochs)
  t0 = time.perf_counter()
  variables, attacker = train_generators(config, train_set, key)
  meta = {"seconds": time.perf_counter() - t0, "attacker": attacker, "config": ia.to_dict()}
  logging.info("input_aware: trained in %.0f s; attacker's classifier %s; caching in %s", meta["seconds"],
               _describe(attacker), path)
  save_once(path, variables, meta)
  return variables, meta


def _describe(m: dict[str, float]) -> str:
  return (f"CA {m['clean_accuracy']:.4f}, ASR {m['attack_success_rate']:.4f}, "
          f"cross-trigger accuracy {m['cross_trigger_accuracy']:.4f}")


def train_generators(config: ml_collections.ConfigDict, train_set: Dataset, key: jax.Array) -> tuple[dict, dict]:
  """Both stages; returns the generator variables and the attacker's classifier's test metrics."""
  ia, mean, std = config.attack.input_aware, config.data.mean, config.data.std
  k_init, k_cls, k_mask, k_joint = jax.random.split(key, 4)
  variables = init_variables(config, train_set.images.shape[1:], k_init)
  g, m = input_aware_trigger.generators(config, train_set.images.shape[-1])
  steps = -(-len(train_set) // ia.batch_size)
  bounds = {int(f * ia.mask_epochs * steps): 0.1 for f in (0.4, 0.8)}
  mask_tx = optax.adam(optax.piecewise_constant_schedule(ia.mask_lr, bounds), *BETAS)
  mstate = train.replicate(train.TrainState.create(apply_fn=m.apply, params=variables["mask"]["params"],
                                                   batch_stats=variables["mask"]["batch_stats"], tx=mask_tx))
  mask_step = make_mask_step(m, ia, mean, std, augment=ia.augment)
  for epoch in range(ia.mask_epochs):
    order = paired_order(len(train_set), ia.batch_size, jax.random.fold_in(k_mask, 2 * epoch))
    mstate, _ = train.run_epoch(mask_step, mstate, train_set.images, train_set.labels, order,
                                jax.random.fold_in(k_mask, 2 * epoch + 1), log_every=config.train.log_every_steps,
                                describe=f"input_aware mask epoch {epoch + 1}/{ia.mask_epochs}")
  mask_vars = train.to_host(train.variables_of(mstate))

  name, width = classifier_spec(config)
  cls_model = models.create_model(name, train_set.num_classes, width)
  total = max(ia.epochs * steps, 1)
  cls_tx = train.sgd(optax.cosine_decay_schedule(ia.classifier_lr, total), config.train.momentum, ia.weight_decay)
  cls = train.create_train_state(cls_model, cls_tx, k_cls, train_set.images.shape[1:])
  gen = train.TrainState.create(apply_fn=g.apply, params=variables["pattern"]["params"],
                                batch_stats=variables["pattern"]["batch_stats"],
                                tx=optax.adam(optax.cosine_decay_schedule(ia.generator_lr, total), *BETAS))
  joint_step = make_joint_step(cls_model, g, m, ia, mean, std, config.attack.target_label, augment=ia.augment)
  state = train.replicate((cls, gen, mask_vars))
  for epoch in range(ia.epochs):
    order = paired_order(len(train_set), ia.batch_size, jax.random.fold_in(k_joint, 2 * epoch))
    state, _ = train.run_epoch(joint_step, state, train_set.images, train_set.labels, order,
                               jax.random.fold_in(k_joint, 2 * epoch + 1), log_every=config.train.log_every_steps,
                               describe=f"input_aware joint epoch {epoch + 1}/{ia.epochs}")
  cls, gen, _ = state
  variables = train.to_host({"pattern": train.variables_of(gen), "mask": mask_vars})
  _, test_set = data_lib.load(config.data, seed=config.seed)
  attacker = attack_metrics(config, variables, cls_model, train.to_host(train.variables_of(cls)), test_set)
  return variables, attacker


def attack_metrics(config: ml_collections.ConfigDict, variables: dict, model: Any, model_vars: dict,
                   test: Dataset) -> dict[str, float]:
  """The attacker's classifier on the test set: CA, ASR (non-target, own triggers), cross-trigger accuracy."""
  predict = train.predictor(model, model_vars, config.data.mean, config.data.std, config.train.eval_batch_size)
  apply_trigger, cross_trigger = input_aware_trigger.make_trigger_fns(config, variables, jax.random.PRNGKey(0))
  keep = test.labels != config.attack.target_label
  target = np.full(int(keep.sum()), config.attack.target_label, test.labels.dtype)
  return {
      "clean_accuracy": float(np.mean(predict(test.images, test.labels)[1] == test.labels)),
      "attack_success_rate": float(np.mean(predict(apply_trigger(test.images[keep]), target)[1] == target)),
      "cross_trigger_accuracy": float(np.mean(predict(cross_trigger(test.images), test.labels)[1] == test.labels)),
  }

