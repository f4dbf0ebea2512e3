"""ABL against BADNETS; see common.py for every field and the variants.

  python launch.py --config=configs/abl_badnets.py --workdir=runs/badnets          # ResNet-18, full CIFAR-10
  python launch.py --config=configs/abl_badnets.py:cpu --workdir=runs/badnets-cpu  # small CNN, 2 CPU cores
  python launch.py --config=configs/abl_badnets.py:fast --workdir=runs/badnets-fast  # airbench recipe, 2 CPU cores
  python launch.py --config=configs/abl_badnets.py:smoke --workdir=/tmp/badnets    # synthetic, seconds
Baselines: add --config.defense.name=none (no defense) or --config.attack.name=none (clean model).

Measured numbers of the cpu variant, with their commands: README (Results) and docs/results.md.
"""
from configs import common


def get_config(variant: str = ""):
  c = common.base_config()
  c.attack.name = "badnets"
  return common.apply_variant(c, variant)
