"""ABL against BADNETS; see common.py for every field and the variants.

  python launch.py --config=configs/abl_badnets.py --workdir=runs/badnets          # ResNet-18, full CIFAR-10
  python launch.py --config=configs/abl_badnets.py:cpu --workdir=runs/badnets-cpu  # small CNN, 2 CPU cores
  python launch.py --config=configs/abl_badnets.py:smoke --workdir=/tmp/badnets    # synthetic, seconds
Baselines: add --config.defense.name=none (no defense) or --config.attack.name=none (clean model).

cpu variant, measured 2026-11-25 (small CNN, 10,000 CIFAR-10 training images, 2 CPU cores):
  no defense CA 0.642, ASR 0.998 (5.6 min); ABL isolation precision 1.00, then CA 0.591, ASR 0.019 with
  the default unlearning, CA 0.503, ASR 0.001 with the paper's (docs/unlearning.md).
"""
from configs import common


def get_config(variant: str = ""):
  c = common.base_config()
  c.attack.name = "badnets"
  return common.apply_variant(c, variant)
