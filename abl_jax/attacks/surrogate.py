"""The clean-label attack's surrogate classifier: trained once on the clean training set, cached with Orbax.

    model, variables = surrogate.load_or_train(config, train)

The cache entry is keyed by a hash of config.attack.surrogate, the normalisation, config.seed and the
training arrays themselves, under config.data.cache_dir (or ~/.cache/abl_jax) / surrogates/. Training is
standard, or PGD adversarial training (L-inf, random start; Madry et al.) when surrogate.adversarial.
Its PRNG key comes from config.seed alone, so the cache key determines the surrogate.
"""
from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from abl_jax import abl, cache, distributed, models, train
from abl_jax.attacks import pgd
from abl_jax.checkpoint import Checkpointer, save_once
from abl_jax.data import Dataset

_VERSION = 1  # Bump when training changes meaning, so that old cache entries are not reused.
_KEY_PURPOSE = 1000  # fold_in(PRNGKey(config.seed), this): apart from experiment's purposes (0..3).


def create(config: ml_collections.ConfigDict, num_classes: int):
  """The surrogate's (untrained) flax module."""
  s = config.attack.surrogate
  return models.create_model(s.model, num_classes, s.width)


def cache_path(config: ml_collections.ConfigDict, train_set: Dataset) -> str:
  """The cache directory of the surrogate that `config` trains on `train_set`."""
  spec = {"surrogate": config.attack.surrogate.to_dict(), "mean": list(config.data.mean),
          "std": list(config.data.std), "seed": config.seed, "momentum": config.train.momentum, "version": _VERSION,
          "numerics": cache.numerics()}
  return cache.entry(config.data.cache_dir, "surrogates", spec, (train_set.images, train_set.labels),
                     prefix=f"{config.attack.surrogate.model}-")


def load_or_train(config: ml_collections.ConfigDict, train_set: Dataset) -> tuple[Any, dict]:
  """(model, variables) of the cached surrogate, trained first (and cached) if there is none."""
  path = cache_path(config, train_set)
  with cache.exclusive(path):  # A parallel run wanting the same surrogate waits for this one and reads it.
    return _load_or_train(config, train_set, path)


def _load_or_train(config: ml_collections.ConfigDict, train_set: Dataset, path: str) -> tuple[Any, dict]:
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_PURPOSE)
  model = create(config, train_set.num_classes)
  if distributed.everywhere(os.path.isdir(path)):  # Every process takes one branch: training is collective.
    like = _variables(model, train_set, key)
    ckpt = Checkpointer(path, 1)
    variables, meta = ckpt.restore(ckpt.latest(), like=like)
    ckpt.close()
    logging.info("surrogate: reusing the cached %s from %s (trained in %.0f s; train accuracy %.3f)",
                 config.attack.surrogate.model, path, meta["seconds"], meta["train_accuracy"])
    return model, variables
  s = config.attack.surrogate
  logging.info("surrogate: no cache at %s; training %s (width %s) for %d epochs (%s)", path, s.model, s.width or
               "default", s.epochs, f"PGD-{s.adv_steps} adversarial, eps {s.adv_eps}" if s.adversarial else "standard")
  t0 = time.perf_counter()
  variables = train_surrogate(config, model, train_set, key)
  meta = {"seconds": time.perf_counter() - t0,
          "train_accuracy": accuracy(model, variables, config, train_set.images, train_set.labels),
          "config": s.to_dict()}
  logging.info("surrogate: trained in %.0f s, train accuracy %.3f; caching it in %s", meta["seconds"],
               meta["train_accuracy"], path)
  save_once(path, variables, meta)
  return model, variables


def _variables(model, train_set: Dataset, key: jax.Array) -> dict:
  """Zero variables of the right shapes, a restore target (eval_shape: nothing is compiled)."""
  x = np.zeros((1, *train_set.images.shape[1:]), np.float32)
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), key)
  return {k: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes.get(k, {})) for k in ("params", "batch_stats")}


def train_surrogate(config: ml_collections.ConfigDict, model, train_set: Dataset, key: jax.Array) -> dict:
  """Trains the surrogate with the project's train step (on PGD examples if adversarial); its variables."""
  s = config.attack.surrogate
  k_init, k_data, k_aug = jax.random.split(key, 3)
  steps = -(-len(train_set) // s.batch_size)
  rate = optax.cosine_decay_schedule(s.lr, max(s.epochs * steps, 1))
  state = train.create_train_state(model, train.sgd(0.0, config.train.momentum, s.weight_decay), k_init,
                                   train_set.images.shape[1:])  # The step takes the rate.
  step = train.make_train_step(model, abl.cross_entropy_loss, config.data.mean, config.data.std,
                               momentum=config.train.momentum, weight_decay=s.weight_decay, augment_data=s.augment)
  if s.adversarial:
    attack = pgd.make_pgd(model, config.data.mean, config.data.std, norm="linf", eps=float(s.adv_eps),
                          step=float(s.adv_step), steps=int(s.adv_steps), random_start=True)
    zero, clean_step = train.replicate(np.int32(0)), step

    def step(state, x, y, k, lr):  # Each batch replaced by PGD examples against the current weights.
      return clean_step(state, attack(train.variables_of(state), x, y, k, zero), y, k, lr)

  state = train.replicate(state)
  for epoch in range(s.epochs):
    order = train.epoch_order(len(train_set), s.batch_size, jax.random.fold_in(k_data, epoch))
    state, _ = train.run_epoch(step, state, train_set.images, train_set.labels, order,
                               jax.random.fold_in(k_aug, epoch), learning_rate=rate,
                               log_every=config.train.log_every_steps,
                               describe=f"surrogate epoch {epoch + 1}/{s.epochs}",
                               eta_steps_after=(s.epochs - epoch - 1) * steps)
  return train.to_host(train.variables_of(state))


def accuracy(model, variables: dict, config: ml_collections.ConfigDict, images: np.ndarray,
             labels: np.ndarray) -> float:
  """The surrogate's accuracy on uint8 `images` (inference mode)."""
  predict = train.predictor(model, variables, config.data.mean, config.data.std, config.train.eval_batch_size)
  return float(np.mean(predict(images, labels)[1] == labels))

