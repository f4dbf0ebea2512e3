"""Every name a config field selects, declared once, and which parts of the defense a config turns on:
validation, the modules that implement them, the configs and the results table read them from here.

    registry.check_name("config.abl.loss", "lga")   # ValueError naming the field and the allowed values
"""
from __future__ import annotations

from typing import Any

SOURCES = ("tfds", "folder", "synthetic")  # config.data.source
MODELS = ("resnet18", "wrn16_1", "small_cnn", "airbench")  # config.model.name
DTYPES = ("auto", "float32", "bfloat16")  # config.train.dtype
SCHEDULES = ("cosine", "step", "constant")  # config.train.schedule
ATTACKS = ("none", "badnets", "blend", "sig", "clean_label", "input_aware", "wanet")  # config.attack.name
DEFENSES = ("none", "abl")  # config.defense.name
ISOLATION_LOSSES = ("lga", "flooding")  # config.abl.loss
UNLEARNING_MODES = ("ascent", "joint")  # config.abl.unlearning_mode
UNLEARNING_LOSSES = ("neg_ce", "complement")  # config.abl.unlearning_loss
UNLEARNING_BN = ("train", "frozen")  # config.abl.unlearning_bn
STOP_RULES = ("none", "isolated_accuracy", "retained_accuracy")  # config.abl.unlearning_stop
POOL_RULES = ("isolated", "ratio", "class_ratio")  # config.abl.pool_rule
FINETUNE_INITS = ("isolation", "scratch", "gauge")  # config.abl.finetune_init
FINETUNE_SCHEDULES = ("step", "cosine")  # config.abl.finetune_schedule
FINETUNE_MIXES = ("none", "cutmix", "mixup")  # config.abl.finetune_mix
RETURN_RULES = ("none", "agree")  # config.abl.return_rule
KEPT_OUT = ("drop", "relabel", "distill", "distill_disagreeing")  # config.abl.kept_out
UNSURE = ("distill", "drop")  # config.abl.unsure
FLAGGED_REJECTED = ("disown", "drop", "excess")  # config.abl.flagged_rejected
FLAGGED_DOUBTED = ("keep", "drop", "return")  # config.abl.flagged_doubted
FLAGGED_UNSURE = ("drop", "keep", "auto")  # config.abl.flagged_unsure
RELEARNED_DOUBTED = ("keep", "drop")  # config.abl.relearned_doubted
RELEARNED_THEN = ("continue", "restart")  # config.abl.relearned_then
RELEARNED_TESTED = ("outliers", "learned")  # config.abl.relearned_tested
RELEARNED_UNTYPICAL = ("skip", "transfer")  # config.abl.relearned_untypical
REGAUGE_INITS = ("fresh", "gauge")  # config.abl.regauge_init
INIT_MODES = ("auto", "always", "never")  # config.distributed.initialize

FIELDS = {
    "config.data.source": SOURCES,
    "config.model.name": MODELS,
    "config.train.dtype": DTYPES,
    "config.train.schedule": SCHEDULES,
    "config.attack.name": ATTACKS,
    "config.defense.name": DEFENSES,
    "config.abl.loss": ISOLATION_LOSSES,
    "config.abl.unlearning_mode": UNLEARNING_MODES,
    "config.abl.unlearning_loss": UNLEARNING_LOSSES,
    "config.abl.unlearning_bn": UNLEARNING_BN,
    "config.abl.unlearning_stop": STOP_RULES,
    "config.abl.pool_rule": POOL_RULES,
    "config.abl.finetune_init": FINETUNE_INITS,
    "config.abl.finetune_schedule": FINETUNE_SCHEDULES,
    "config.abl.finetune_mix": FINETUNE_MIXES,
    "config.abl.gauge_mix": FINETUNE_MIXES,
    "config.abl.return_rule": RETURN_RULES,
    "config.abl.kept_out": KEPT_OUT,
    "config.abl.unsure": UNSURE,
    "config.abl.flagged_rejected": FLAGGED_REJECTED,
    "config.abl.flagged_doubted": FLAGGED_DOUBTED,
    "config.abl.flagged_unsure": FLAGGED_UNSURE,
    "config.abl.relearned_doubted": RELEARNED_DOUBTED,
    "config.abl.relearned_then": RELEARNED_THEN,
    "config.abl.relearned_tested": RELEARNED_TESTED,
    "config.abl.relearned_untypical": RELEARNED_UNTYPICAL,
    "config.abl.regauge_init": REGAUGE_INITS,
    "config.distributed.initialize": INIT_MODES,
}


def check_name(field: str, value: Any) -> None:
  """Raises ValueError naming `field` and its allowed values unless `value` is one of them."""
  allowed = FIELDS[field]
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is unknown; allowed: {', '.join(allowed)}")


def check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
  """Raises ValueError naming `field` and its interval unless low <= value <= high (or < where open)."""
  ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{field}={value} must be in {interval}")


def distills(abl: Any) -> bool:
  """Whether the defense's judge (the gauge, or fine-tuning itself without one) trains the pool examples toward its
  probabilities (config.abl; where contradiction, owning, disowning and the outlier labels act)."""
  return abl.return_rule != "none" and abl.kept_out in ("distill", "distill_disagreeing")


def looks_for_outlier_labels(abl: Any) -> bool:
  """Whether the defense looks for labels whose examples the judge rejects unusually often (config.abl)."""
  return bool(distills(abl) and abl.class_outlier_z and abl.disown_below)
