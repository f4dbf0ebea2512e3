"""config.train.dtype: bfloat16 activations with float32 state, the auto rule, and the smoke config in bfloat16."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abl_jax import abl, experiment, models, train
from smoke import config as smoke


def test_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert models.compute_dtype("auto", "gpu") == models.compute_dtype("auto", "tpu") == "bfloat16"
  assert models.compute_dtype("auto", "cpu") == "float32"
  assert models.compute_dtype("float32", "gpu") == "float32"
  with pytest.raises(ValueError, match=r"config\.train\.dtype='float16' is unknown; allowed: auto, float32, bfloat16"):
    models.compute_dtype("float16")


def test_bfloat16_step_computes_in_bfloat16_and_keeps_float32_state():
  model = models.create_model("small_cnn", 10, 4, dtype=jnp.bfloat16)
  state = train.create_train_state(model, train.sgd(0.1, 0.9, 5e-4), jax.random.PRNGKey(0), (8, 8, 3))
  step = train.make_train_step(model, abl.cross_entropy_loss, (0.5,) * 3, (0.25,) * 3, momentum=0.9,
                               weight_decay=5e-4, augment_data=False)
  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4 * n, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (4 * n,)).astype(np.int32)
  args = (train.replicate(state), train.put_batch(images), train.put_batch(labels),
          train.replicate(jax.random.PRNGKey(0)), train.replicate(np.float32(0.1)))
  hlo = step.lower(*args).as_text()
  assert "bf16" in hlo and "convolution" in hlo
  new, metrics = step(*args)
  new = train.to_host(new)
  for part in (new.params, new.opt_state, new.batch_stats):
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(part) if hasattr(leaf, "dtype") and leaf.ndim}
    assert dtypes == {np.dtype(np.float32)}, dtypes
  # The step changed the parameters and statistics (it trained), and its loss is a finite float32.
  assert not np.allclose(new.batch_stats["BatchNorm_0"]["mean"], 0.0)
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(np.asarray(metrics["loss"])).all()


def test_smoke_config_trains_in_bfloat16(tmp_path, runs):
  _, none32, _ = runs  # The float32 run of the same config (tests/conftest.py).
  bf16 = experiment.train_and_evaluate(smoke(defense__name="none", train__dtype="bfloat16"), str(tmp_path))
  assert bf16["clean_accuracy"] > 0.15 and bf16["attack_success_rate"] > 0.9  # As the float32 run (chance: 0.1).
  assert abs(bf16["clean_accuracy"] - none32["clean_accuracy"]) < 0.1


def test_auto_dtype_is_the_dtype_it_resolves_to(tmp_path, runs):
  root, none, _ = runs
  # The session's run asked for 'auto' (float32 on CPU): asking for float32 is the same run.
  assert experiment.train_and_evaluate(smoke(defense__name="none", train__dtype="float32"), str(root / "none")) == none
  with pytest.raises(experiment.WorkdirError, match=r"config\.train\.dtype: 'float32' -> 'bfloat16'"):
    experiment.train_and_evaluate(smoke(defense__name="none", train__dtype="bfloat16"), str(root / "none"))
