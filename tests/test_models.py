"""Shapes, parameter counts, BatchNorm behaviour and cross-device BatchNorm of the models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abl_jax import models, train


def _init_shapes(model, image_size: int = 32):
  """Variable shapes, without compiling."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def _numpy_variables(model, image_size: int, seed: int = 0):
  """He-normal kernels, unit BN scales and variances, zero biases and means; no XLA compile."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(fill, _init_shapes(model, image_size))


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,width,expected", [
    # PyTorch CIFAR ResNet-18 (kuangliu), BN scale/bias included, running stats excluded.
    ("resnet18", 0, 11_173_962),
    # PyTorch WRN-16-1 of the ABL code: conv 432 + group1 9,344 + group2 32,992 + group3 131,520
    # + final BN 128 + fc 650.
    ("wrn16_1", 0, 175_066),
    # convs 3*16*9 + 16*16*9 + 16*32*9 + 32*32*9 + 32*64*9 + 64*64*9 = 71,856;
    # BN 2*(16+16+32+32+64+64) = 448; Dense 64*10 + 10 = 650.
    ("small_cnn", 0, 72_954),
    # Width 8 (smoke): convs 18,072 + BN 224 + Dense 330.
    ("small_cnn", 8, 18_626),
])
def test_param_counts(name, width, expected):
  variables = _init_shapes(models.create_model(name, 10, width))
  assert _count(variables["params"]) == expected
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes_and_dtype(name, train):
  model = models.create_model(name, 7, dtype=jnp.bfloat16)
  variables = _init_shapes(model)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  mutable = ["batch_stats"] if train else False
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, mutable=mutable), variables, x)
  logits = out[0] if train else out
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))  # Parameters stay float32.
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  if train:
    assert jax.tree.map(lambda a: (a.shape, a.dtype), out[1]["batch_stats"]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables["batch_stats"])


def test_bfloat16_forward():
  model = models.create_model("small_cnn", 7, width=4, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(_numpy_variables(model, 32), x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_train_mode_updates_batch_stats():
  model = models.create_model("small_cnn", 10, width=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3)) * 3 + 1
  variables = _numpy_variables(model, 16)
  logits, updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), old, new)
  assert all(jax.tree.leaves(changed))
  # Evaluation needs no mutable collection and uses the running statistics.
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {"params": variables["params"], **updates}, x)
  assert eval_logits.shape == (4, 10)
  assert not np.allclose(eval_logits, logits)


@pytest.mark.parametrize("name,width", [("small_cnn", 4), ("wrn16_1", 0), ("resnet18", 4)])
def test_bn_statistics_are_global_when_the_batch_is_split_over_devices(name, width):
  assert jax.local_device_count() >= 2, "tests/conftest.py should give 2 CPU devices"
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3)) * 2 + 0.5
  x = x.at[4:].add(3.0)  # Each device's half has its own mean: per-device statistics would differ.
  model = models.create_model(name, 10, width)
  variables = _numpy_variables(model, 16)
  apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
  one = train.make_mesh(jax.local_devices()[:1])
  two = train.make_mesh(jax.local_devices()[:2])
  logits, updates = train.data_parallel(apply, one, batch_args=(1,), num_args=2)(variables, train.put_batch(x, one))
  split = train.put_batch(np.asarray(x), two)
  assert len(split.sharding.device_set) == 2
  s_logits, s_updates = train.data_parallel(apply, two, batch_args=(1,), num_args=2)(variables, split)
  np.testing.assert_allclose(s_logits, logits, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(s_updates), jax.tree.leaves(updates)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unknown_name():
  allowed = "resnet18, wrn16_1, small_cnn, airbench"
  with pytest.raises(ValueError, match=rf"config.model.name='vgg' is unknown; allowed: {allowed}"):
    models.create_model("vgg", 10)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 5, 2)])
def test_max_pool_2x2_matches_flax_values_and_gradients(shape):
  from flax import linen as nn
  from abl_jax.models.small_cnn import max_pool_2x2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)  # No ties: the gradients must agree exactly.
  reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))  # noqa: E731
  np.testing.assert_array_equal(max_pool_2x2(x), reference(x))  # Odd sizes drop the last row / column.
  w = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
  grad = lambda f: jax.grad(lambda v: jnp.sum(f(v) * w))(x)  # noqa: E731
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(reference))


@pytest.mark.parametrize("shape,kwargs", [
    ((8, 6, 6, 12), {}),  # 288 rows: the wide view sums 64 rows of 12 channels at a time.
    ((3, 5, 7, 6), {}),  # An odd row count: no wide view.
    ((4, 4, 4, 16), {"use_scale": False, "use_bias": False}),  # airbench's form.
])
def test_batch_norm_matches_flax_values_gradients_and_statistics(shape, kwargs):
  from flax import linen as nn
  from abl_jax.models.batch_norm import BatchNorm
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 1
  w = jax.random.normal(jax.random.PRNGKey(1), shape)
  ours, theirs = (m(momentum=0.9, epsilon=1e-5, **kwargs) for m in (BatchNorm, nn.BatchNorm))
  variables = theirs.init(jax.random.PRNGKey(2), x, use_running_average=False)
  shapes = jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x, use_running_average=False))
  assert shapes == jax.tree.map(jnp.shape, variables)
  if "params" in variables:  # Away from the initial values, so that the scale and bias gradients are tested.
    variables = {**variables, "params": {"scale": variables["params"]["scale"] + 0.3,
                                         "bias": variables["params"]["bias"] - 0.2}}

  def loss(module, params, x):
    y, updates = module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y) * w), updates  # Smooth: no kink where the two might round apart.

  params = variables.get("params", {})
  results = [jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(m, params, x) for m in (ours, theirs)]
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  stats = results[0][0][1]["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * np.mean(np.asarray(x), axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.var(np.asarray(x), axis=(0, 1, 2)), rtol=1e-5)
  trained = {**variables, "batch_stats": stats}
  np.testing.assert_allclose(ours.apply(trained, x, use_running_average=True),
                             theirs.apply(trained, x, use_running_average=True), rtol=1e-5, atol=1e-5)


def test_batch_norm_keeps_bfloat16_activations_and_float32_statistics():
  from abl_jax.models.batch_norm import BatchNorm
  x = (jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 16)) * 2 + 1).astype(jnp.bfloat16)
  module = BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
  variables = module.init(jax.random.PRNGKey(1), x)
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and updates["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32).mean(axis=(0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(np.asarray(y, np.float32).std(axis=(0, 1, 2)), 1.0, atol=0.05)
  grad = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mutable=["batch_stats"])[0].astype(jnp.float32) ** 2))(x)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))
