"""The seed report's results table: a clean model, and for each attack a model without defense and one with ABL.

  python launch.py --config=configs/table.py --workdir=runs/table              # ResNet-18, full CIFAR-10
  python launch.py --config=configs/table.py:cpu --workdir=runs/table-cpu      # small CNN, 2 CPU cores
  python launch.py --config=configs/table.py:smoke --workdir=/tmp/table-smoke  # synthetic data, minutes
  python launch.py --mode=report --workdir=runs/table-cpu                      # report.md, report.json

Each row runs in WORKDIR/<row> (clean, badnets_none, badnets_abl, ...) with the config of
configs/abl_<attack>.py:<variant>; a finished row is skipped, an interrupted one resumed.
Rows: --config.table.only=clean,sig_abl (row names, or pair names such as sig or wanet_1pct for both rows of
the pair; '' = all).
One row's field: --config.rows.sig_abl.abl.isolation_epochs=10; every row's: --config.table.set='abl.unlearning_epochs=5'.
Several seeds: --config.table.seeds=0,1 (each seed's table in WORKDIR/s<seed>/, the report their mean and range).
"""
import importlib

import ml_collections

from abl_jax import registry
from configs import common

# The table's row pairs, each an attack with its configs/abl_<attack>.py, or a name of RATES: a new attack is
# one more name here.
ATTACKS = ("badnets", "blend", "sig", "clean_label", "input_aware", "wanet", "badnets_1pct", "wanet_1pct")
# Pairs that are another attack at another poison rate (any attack's rate is also one override away:
# --config.rows.<pair>_<defense>.attack.poison_rate=0.01, or --config.attack.poison_rate=0.01 for one run).
RATES = {"badnets_1pct": ("badnets", 0.01), "wanet_1pct": ("wanet", 0.01)}
DEFENSES = registry.DEFENSES
# cpu: the rows that fit in well under an hour on 2 cores (the seed's attacks are clean-label and SIG); the
# others are --config.table.only=wanet,badnets_1pct,wanet_1pct (about 5 min per row; docs/results.md).
CPU_ROWS = "clean,badnets,sig,clean_label"


def row_names(attacks=ATTACKS) -> tuple[str, ...]:
  """The table's rows in order: the clean model, then each attack without defense and with ABL."""
  return ("clean",) + tuple(f"{a}_{d}" for a in attacks for d in DEFENSES)


def attack_config(attack: str, variant: str) -> ml_collections.ConfigDict:
  """configs/abl_<attack>.py:<variant>; for a name of RATES, its attack's config at its poison rate."""
  if attack in RATES:
    attack, rate = RATES[attack]
    c = attack_config(attack, variant)
    c.attack.poison_rate = rate
    return c
  return importlib.import_module(f"configs.abl_{attack}").get_config(variant)


def get_config(variant: str = ""):
  if variant not in common.VARIANTS:
    raise ValueError(f"config variant {variant!r} is unknown; allowed: {', '.join(map(repr, common.VARIANTS))}")
  c = ml_collections.ConfigDict()
  c.table = ml_collections.ConfigDict()
  c.table.variant = variant
  c.table.order = row_names()  # Row order of the sweep and the report.
  c.table.only = CPU_ROWS if variant in common.CPU_VARIANTS else ""  # Rows to run (names, attacks); '' = all.
  c.table.seeds = ""  # Seeds, e.g. '0,1': the table once per seed in WORKDIR/s<seed>/, WORKDIR/report.md the
  #                     mean and range over them; '' = once, with the rows' config.seed, in WORKDIR/<row>.
  c.table.set = ""  # Fields set in every row, e.g. the paper's unlearning:
  #                   'abl.unlearning_mode=ascent;abl.unlearning_loss=neg_ce;abl.joint_exclude_ratio=0.0'.
  c.table.plots = True  # Write each row's pictures (and each attack's gallery) once it is finished.
  c.rows = ml_collections.ConfigDict()
  clean = attack_config("badnets", variant)
  clean.attack.name, clean.defense.name = "none", "none"
  c.rows.clean = clean
  for attack in ATTACKS:
    for defense in DEFENSES:
      row = attack_config(attack, variant)
      row.defense.name = defense
      c.rows[f"{attack}_{defense}"] = row
  return c
