"""ABL against the clean-label (label-consistent) attack; see common.py for every field and the variants.

  python launch.py --config=configs/abl_clean_label.py --workdir=runs/cl          # ResNet-18, full CIFAR-10
  python launch.py --config=configs/abl_clean_label.py:cpu --workdir=runs/cl-cpu  # small CNN, 2 CPU cores
  python launch.py --config=configs/abl_clean_label.py:smoke --workdir=/tmp/cl    # synthetic, seconds
Baselines: add --config.defense.name=none (no defense) or --config.attack.name=none (clean model).
Picture of the poisoning: python -m abl_jax.attacks.clean_label_figure --config=configs/abl_clean_label.py:cpu --out=cl.png

Full size: an adversarially trained ResNet-18 surrogate (30 epochs, PGD-7, eps 8), L-inf PGD eps 8, step 1.5,
100 steps on half of the target class (poison_rate 0.05 of the whole set), BadNets' grid bottom-right.
cpu: the attack made affordable on 2 cores: the surrogate is the small CNN (widths 16-32-64) adversarially
trained for 3 epochs with PGD-2 (eps 8, step 4) on the 10,000-image subset, without augmentation; the
poisoning PGD takes 10 steps of 2 (eps 8). The surrogate is cached, so the
second run reuses it (training it took 16 min on this project's busy 2-core machine, PGD 40-100 s).
smoke: a width-8 CNN surrogate, 1 epoch with PGD-1; PGD 5 steps.
Other settings: --config.attack.pgd.norm=l2 --config.attack.pgd.eps=600 --config.attack.pgd.step=60;
--config.attack.trigger_style=all_corners --config.attack.trigger_amplitude=64 (Turner et al.'s variants);
--config.attack.surrogate.adversarial=False; --config.attack.poison_rate=0.1 (the whole target class).

Measured numbers of the cpu variant, with their commands: README (Results) and docs/results.md.
"""
from configs import common


def get_config(variant: str = ""):
  c = common.add_clean_label(common.base_config())
  c.attack.name = "clean_label"
  c.attack.poison_rate = 0.05  # Of the whole set: half of CIFAR-10's target class (at most 0.1 = all of it).
  common.apply_variant(c, variant)
  s, p = c.attack.surrogate, c.attack.pgd
  if variant in common.CPU_VARIANTS:
    s.model, s.width, s.epochs, s.augment = "small_cnn", 16, 3, False
    s.adv_steps, s.adv_step = 2, 4.0
    p.steps, p.step = 10, 2.0
  elif variant == "smoke":
    s.model, s.width, s.epochs, s.augment, s.batch_size = "small_cnn", 8, 1, False, 64
    s.adv_steps, s.adv_step = 1, 8.0
    p.steps, p.step, p.batch_size = 5, 2.0, 128
  return c
