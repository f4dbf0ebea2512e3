"""The BadNets smoke config with overrides, shared by the end-to-end tests."""
from configs import abl_badnets

# The defense before the gauge became the default (docs/defense.md): the isolated 1% left out of fine-tuning
# from the isolation model, then unlearning. Most end-to-end tests exercise it (it has every phase);
# default() is the current default.
PREVIOUS_DEFAULT = dict(abl__score_epochs=1, abl__pool_rule="isolated", abl__finetune_schedule="step",
                        abl__finetune_balance=False, abl__return_rule="none", abl__gauge_epochs=0,
                        abl__kept_out="drop", abl__unlearning_epochs=3, abl__spectral_skew=0.0,
                        abl__spectral_kurtosis=0.0)


def default(**overrides):
  """configs/abl_badnets.py:smoke with `group__field=value` overrides."""
  c = abl_badnets.get_config("smoke")
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def config(**overrides):
  """The smoke config with the previous default defense, then `group__field=value` overrides."""
  return default(**{**PREVIOUS_DEFAULT, **overrides})
