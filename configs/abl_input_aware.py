"""ABL against the input-aware dynamic backdoor; see common.py for every field and the variants.

  python launch.py --config=configs/abl_input_aware.py --workdir=runs/ia          # ResNet-18, full CIFAR-10
  python launch.py --config=configs/abl_input_aware.py:cpu --workdir=runs/ia-cpu  # small CNN, 2 CPU cores
  python launch.py --config=configs/abl_input_aware.py:smoke --workdir=/tmp/ia    # synthetic, about a minute
Baselines: add --config.defense.name=none (no defense) or --config.attack.name=none (clean model).
Picture of the triggers: python -m abl_jax.attacks.input_aware_figure --config=configs/abl_input_aware.py:cpu --out=ia.png

The attacker first trains its generators (cached under config.data.cache_dir or ~/.cache/abl_jax/input_aware,
so a second run with the same attack settings reuses them), then 10% of the training set (non-target images)
gets its own trigger and the target label and another 10% the trigger of another image with its true label;
the victim is trained from scratch on that fixed set, with ABL or without defense.
Full size: G and M of the published shape (widths 32-64-128), 25 mask epochs, 100 joint epochs with the victim's
model (ResNet-18) as the attacker's classifier, with crop + flip.
cpu: G and M at half width (16-32-64), 2 mask epochs and 6 joint epochs with the small CNN (widths 16-32-64) as
the attacker's classifier (SGD lr 0.05), no augmentation, on the 10,000-image subset; the victim is common.py's
cpu variant (8 epochs without defense; the defense as common.py sets it).
smoke: G and M of width 4, 1 mask epoch and 2 joint epochs on the synthetic data.
"""
from configs import common


def get_config(variant: str = ""):
  c = common.add_input_aware(common.base_config())
  c.attack.name = "input_aware"
  c.attack.poison_rate = 0.1  # Backdoor examples (own trigger, target label), of the whole set.
  common.apply_variant(c, variant)
  ia = c.attack.input_aware
  if variant in common.CPU_VARIANTS:
    ia.generator_width, ia.mask_epochs, ia.epochs = 16, 2, 6
    ia.classifier_lr, ia.augment = 0.05, False
  elif variant == "smoke":
    ia.generator_width, ia.mask_epochs, ia.epochs = 4, 1, 2
    ia.classifier_lr, ia.augment, ia.batch_size = 0.05, False, 64
  return c
