"""ABL against BLEND; see common.py for every field and the variants.

  python launch.py --config=configs/abl_blend.py --workdir=runs/blend          # ResNet-18, full CIFAR-10
  python launch.py --config=configs/abl_blend.py:cpu --workdir=runs/blend-cpu  # small CNN, 2 CPU cores
  python launch.py --config=configs/abl_blend.py:smoke --workdir=/tmp/blend    # synthetic, seconds
Baselines: add --config.defense.name=none (no defense) or --config.attack.name=none (clean model).

cpu variant, measured 2026-11-25 (small CNN, 10,000 CIFAR-10 training images, 2 CPU cores):
  no defense CA 0.630, ASR 0.999; ABL isolation precision 1.00, then CA 0.598, ASR 0.017 with the
  default unlearning, CA 0.399, ASR 0.001 with the paper's (docs/unlearning.md).
"""
from configs import common


def get_config(variant: str = ""):
  c = common.base_config()
  c.attack.name = "blend"
  return common.apply_variant(c, variant)
