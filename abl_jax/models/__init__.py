"""Image classifiers: `create_model(name, num_classes, width)` for `config.model`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from abl_jax import registry
from abl_jax.models.airbench import Airbench, as_attribute, whitening_filters
from abl_jax.models.resnet import WRN16_1, ResNet18, WideResNet
from abl_jax.models.small_cnn import SmallCNN

from abl_jax.registry import DTYPES, MODELS


def compute_dtype(name: str, backend: str | None = None) -> str:
  """The activation dtype `config.train.dtype` names: auto is bfloat16 on GPU/TPU and float32 on CPU."""
  registry.check_name("config.train.dtype", name)
  if name == "auto":
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
  return name


def create_model(name: str, num_classes: int, width: int = 0, dtype: Any = jnp.float32,
                 whitening: np.ndarray | None = None) -> nn.Module:
  """The model `name`; width 0 means its default (resnet18: 64, small_cnn: 16, airbench: 64; wrn16_1 ignores it).

  `whitening`: airbench's first-layer filters (models.whitening_filters of the training images); None gives
  identity filters, enough to restore a checkpoint into (it holds the filters). Other models ignore it.
  """
  kwargs = dict(num_classes=num_classes, dtype=dtype)
  if width:
    kwargs["width"] = width
  if name == "resnet18":
    return ResNet18(**kwargs)
  if name == "small_cnn":
    return SmallCNN(**kwargs)
  if name == "airbench":
    return Airbench(whitening=as_attribute(whitening), **kwargs)
  if name == "wrn16_1":
    kwargs.pop("width", None)
    return WRN16_1(**kwargs)
  registry.check_name("config.model.name", name)
  raise AssertionError(name)


__all__ = ["DTYPES", "MODELS", "compute_dtype", "Airbench", "ResNet18", "SmallCNN", "WRN16_1", "WideResNet",
           "create_model", "whitening_filters"]
