"""ABL against SIG; see common.py for every field and the variants.

  python launch.py --config=configs/abl_sig.py --workdir=runs/sig          # ResNet-18, full CIFAR-10
  python launch.py --config=configs/abl_sig.py:cpu --workdir=runs/sig-cpu  # small CNN, 2 CPU cores
  python launch.py --config=configs/abl_sig.py:fast --workdir=runs/sig-fast  # airbench: isolation fails (benchmarks.md)
  python launch.py --config=configs/abl_sig.py:smoke --workdir=/tmp/sig    # synthetic, seconds
Baselines: add --config.defense.name=none (no defense) or --config.attack.name=none (clean model).

Measured numbers of the cpu variant, with their commands: README (Results) and docs/results.md.
"""
from configs import common


def get_config(variant: str = ""):
  c = common.base_config()
  c.attack.name = "sig"
  c.attack.poison_rate = 0.01  # 1% of the set = 10% of CIFAR-10's target class, the seed report's setting.
  common.apply_variant(c, variant)
  return c
