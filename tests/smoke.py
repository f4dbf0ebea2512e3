"""The BadNets smoke config with overrides, shared by the end-to-end tests."""
from configs import abl_badnets


def config(**overrides):
  """configs/abl_badnets.py:smoke with `group__field=value` overrides."""
  c = abl_badnets.get_config("smoke")
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c
