"""WaNet's strength three ways: the materialised uint8 set, the same set without rounding, and per-batch poisoning.

  python benchmarks/wanet_rounding.py --config=configs/abl_wanet.py:cpu --modes=uint8,float,on_the_fly,clean \
      --out=runs/wanet-rounding.json

Each mode trains the config's no-defense baseline (model, epochs, lr schedule, batch size; no augmentation
unless config.train.augment) with the same initialisation and batch order, then reports CA, ASR on the uint8
warped test set (as the experiment measures it) and on the unrounded one, and the noise-mode accuracy:
  uint8       the pipeline's training set: warped and noise-mode images rounded to uint8 once (wanet.poison).
  float       the same images, indices and noise, kept as float32 (no rounding): what rounding changes.
  on_the_fly  BackdoorBench's victim training: in every batch, the first int(rate * batch) images (any class)
              are warped and relabelled and the next int(cross_ratio * that) get a fresh noise-mode warp,
              float32, no rounding. (BackdoorBench poisons one image per batch with probability rate * batch
              when rate * batch < 1; at rate 0.01 and batch 128 it poisons int(1.28) = 1.)
  clean       no attack: the clean model's rate of predicting the target on warped non-target test images.
Not a test: a measurement for docs/wanet.md.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The repo, if not installed.
from abl_jax import xla_flags  # noqa: E402  pylint: disable=g-import-not-at-top

xla_flags.prefer_xla_cpu_convolutions()  # The kernels launch.py uses.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from abl_jax import abl, attacks, data, experiment, schedule as schedule_lib, train  # noqa: E402
from abl_jax.attacks import wanet  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/abl_wanet.py:cpu", "Config file with variant.")
_MODES = flags.DEFINE_string("modes", "uint8,float,on_the_fly,clean", "Comma-separated modes.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here too.")


def _batches(images, labels, order, mode, cfg, field, key):
  """Yields (images float32 or uint8, labels) per step; on_the_fly poisons each batch as BackdoorBench."""
  bs = order.shape[1]
  num_bd = int(cfg.poison_rate * bs)
  num_cross = int(num_bd * cfg.wanet.cross_ratio)
  for i, idx in enumerate(order):
    x, y = images[idx], labels[idx].copy()
    if mode == "on_the_fly":
      x = x.astype(np.float32)
      x[:num_bd] = np.asarray(wanet.warp(images[idx[:num_bd]], field, round_output=False))
      y[:num_bd] = cfg.target_label
      x[num_bd:num_bd + num_cross] = np.asarray(wanet.noise_warp(
          images[idx[num_bd:num_bd + num_cross]], field, jax.random.fold_in(key, i), round_output=False))
    yield x, y


def run_mode(config, mode: str, clean_train, test, poisoned) -> dict:
  """Trains one mode's no-defense model; returns its metrics and wall time."""
  cfg = config.attack
  k_field, _, k_noise, _ = jax.random.split(schedule_lib.key_for(config, "poison"), 4)  # As wanet.poison splits it.
  field = wanet.field_from_config(cfg, k_field, *clean_train.images.shape[1:3])
  if mode == "uint8":
    images, labels = poisoned.train.images, poisoned.train.labels
  elif mode == "float":  # The same examples as the uint8 set, not rounded.
    images, labels = clean_train.images.astype(np.float32), poisoned.train.labels
    bd, noise = poisoned.is_poisoned, poisoned.is_cross
    images[bd] = np.asarray(wanet.warp(clean_train.images[bd], field, round_output=False))
    # wanet.poison's noise: one call on all noise-mode images from k_noise (chunks of 4096 fold in the start).
    parts = [np.asarray(wanet.noise_warp(clean_train.images[noise][s:s + 4096], field, jax.random.fold_in(k_noise, s),
                                         round_output=False)) for s in range(0, int(noise.sum()), 4096)]
    images[noise] = np.concatenate(parts)
  else:  # on_the_fly and clean start from the clean set.
    images, labels = clean_train.images, clean_train.labels
  model = experiment._model(config, clean_train)
  t = config.train
  steps = -(-len(images) // t.batch_size)
  schedule = optax.cosine_decay_schedule(t.learning_rate, max(t.epochs * steps, 1))
  state = train.create_train_state(model, train.sgd(0.0, t.momentum, t.weight_decay),  # The step takes the rate.
                                   schedule_lib.key_for(config, "init"), images.shape[1:])
  step_fn = train.make_train_step(model, abl.cross_entropy_loss, config.data.mean, config.data.std,
                                  momentum=t.momentum, weight_decay=t.weight_decay, augment_data=t.augment)
  rates = train.learning_rates(schedule, 0, t.epochs * steps)
  state = train.replicate(state)
  t0 = time.perf_counter()
  for epoch in range(t.epochs):
    order = train.epoch_order(len(images), t.batch_size, jax.random.fold_in(schedule_lib.key_for(config, "data"), epoch))
    key = jax.random.fold_in(schedule_lib.key_for(config, "augment"), epoch)
    for i, (x, y) in enumerate(_batches(images, labels, order, mode, cfg, field, key)):
      state, _ = step_fn(state, train.put_batch(x), train.put_batch(y), train.replicate(jax.random.fold_in(key, i)),
                         train.replicate(rates[epoch * steps + i]))
    logging.info("%s: epoch %d/%d done", mode, epoch + 1, t.epochs)
  seconds = time.perf_counter() - t0
  keep = test.labels != cfg.target_label
  target = np.full(int(keep.sum()), cfg.target_label, np.int32)
  warped_u8 = np.asarray(wanet.warp(test.images[keep], field))
  warped_f = np.asarray(wanet.warp(test.images[keep], field, round_output=False))
  noisy = attacks.cross_test_set(test, poisoned)

  predict = train.predictor(model, train.variables_of(state), config.data.mean, config.data.std, t.eval_batch_size)

  def acc(x, y):
    return float(np.mean(predict(x, y)[1] == y))

  return {"mode": mode, "epochs": t.epochs, "clean_accuracy": acc(test.images, test.labels),
          "asr_uint8_test": acc(warped_u8, target), "asr_float_test": acc(warped_f, target),
          "noise_mode_accuracy": acc(noisy.images, noisy.labels), "train_seconds": seconds}


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  clean_train, test = data.load(config.data, seed=config.seed)
  poisoned = attacks.poison(config.attack, clean_train, schedule_lib.key_for(config, "poison"), config=config)
  diff = np.abs(poisoned.train.images.astype(np.float32) - clean_train.images)
  field_cfg = config.attack
  k_field = jax.random.split(schedule_lib.key_for(config, "poison"), 4)[0]
  field = wanet.field_from_config(field_cfg, k_field, *clean_train.images.shape[1:3])
  bd = poisoned.is_poisoned
  exact = np.asarray(wanet.warp(clean_train.images[bd], field, round_output=False))
  stats = {"mean_abs_warp_change": float(diff[bd].mean()),
           "mean_abs_rounding_error": float(np.abs(poisoned.train.images[bd] - exact).mean()),
           "share_pixels_changed_by_rounded_warp": float((diff[bd] > 0).mean())}
  print(json.dumps(stats))
  results = {"config": f"{config.attack.name} rate {config.attack.poison_rate}", "trigger": stats, "modes": []}
  for mode in _MODES.value.split(","):
    r = run_mode(config, mode.strip(), clean_train, test, poisoned)
    print(json.dumps(r))
    results["modes"].append(r)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
