"""What launch.py tells a user: one line for a mistake of theirs, close matches for an unknown field,
a warning for a field set that the run does not use.

    config_fields(config)                     # every field path: 'config.train.epochs', ...
    unknown_field_message(config, "config.train.nope")  # 'unknown field ...; did you mean ...'
    unused_overrides(config, ["config.train.learning_rate"])  # [(field, what this run uses instead)]
    is_user_error(e), one_line(e)             # exit code 2 and this line, not a traceback
    with interrupts_repeated(): ...           # Ctrl-C raises KeyboardInterrupt until something catches it
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import re
import signal
import sys
from typing import Any, Iterable, Iterator

import ml_collections

from abl_jax import data, registry
from abl_jax.checkpoint import CheckpointMismatchError, DamagedCheckpointError
from abl_jax.workdir import WorkdirError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C.
USER_ERRORS = (WorkdirError, data.DataError, CheckpointMismatchError, DamagedCheckpointError, FileNotFoundError,
               NotADirectoryError, IsADirectoryError, PermissionError)


def config_fields(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """Every leaf field of `config` as a dotted path."""
  out = []
  for key in sorted(config.keys()):
    value = config[key]
    path = f"{prefix}.{key}"
    out += config_fields(value, path) if isinstance(value, ml_collections.ConfigDict) else [path]
  return out


def has_field(config: ml_collections.ConfigDict, path: str) -> bool:
  """Whether dotted `path` ('config.train.epochs') names a field or group of `config`."""
  node: Any = config
  for part in path.split(".")[1:]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def unknown_field_message(config: ml_collections.ConfigDict, path: str) -> str:
  """'unknown field PATH; did you mean ...' with the closest existing fields."""
  fields = config_fields(config)
  group = path.rsplit(".", 1)[0]
  if not has_field(config, group):
    groups = sorted(k for k in config.keys() if isinstance(config[k], ml_collections.ConfigDict))
    close = difflib.get_close_matches(path, fields, n=3, cutoff=0.75)
    hint = (f"did you mean {', '.join(close)}? " if close else "") + f"the groups are {', '.join(groups)}"
    return f"unknown field {path}; {hint} (every field is described in configs/common.py)"
  # Close matches on the whole path, and on the last name within its group (train.lr -> train.learning_rate).
  close = difflib.get_close_matches(path, fields, n=3, cutoff=0.6)
  close += [f for f in fields if f.startswith(group + ".") and f not in close and difflib.SequenceMatcher(
      None, path.rsplit(".", 1)[1], f.rsplit(".", 1)[1]).ratio() >= 0.5][:3 - len(close)]
  hint = f"did you mean {', '.join(close)}?" if close else (
      f"{group} has {', '.join(f.rsplit('.', 1)[1] for f in fields if f.startswith(group + '.'))}")
  return f"unknown field {path}; {hint} (every field is described in configs/common.py)"


def override_paths(argv: Iterable[str]) -> list[str]:
  """The fields set on the command line: 'config.train.epochs' for --config.train.epochs=3."""
  return [m.group(1) for a in argv if (m := re.match(r"^--?(config\.[\w.]+)(=|$)", a))]


def _joint(config):
  return config.abl.unlearning_mode == "joint"


def _distills(config):
  return registry.distills(config.abl)


def _outliers(config):
  return registry.looks_for_outlier_labels(config.abl)


_DISTILLED = "it applies where the pool is distilled (abl.return_rule=agree, abl.kept_out=distill)"


def _disowns(config):
  """Whether every pool example trains toward the judge's probabilities: the spectral tests disown through it."""
  return _distills(config) and config.abl.kept_out == "distill"


_SPECTRAL = ("it applies where every pool example trains toward the judge's probabilities (abl.return_rule != 'none', "
             "abl.kept_out='distill'), which it disowns through")

# (field prefix, or a whole field ending in $; whether this run ignores it; what does apply instead).
_RULES = (
    ("config.abl.", lambda c: c.defense.name == "none",
     "the abl group applies to ABL runs only (--config.defense.name=abl); this run trains train.epochs at "
     "train.learning_rate"),
    ("config.train.epochs", lambda c: c.defense.name == "abl",
     "ABL's epochs are abl.isolation_epochs, abl.finetune_epochs, abl.unlearning_epochs"),
    ("config.train.learning_rate", lambda c: c.defense.name == "abl",
     "ABL's learning rates are abl.isolation_lr, abl.finetune_lr, abl.unlearning_lr"),
    ("config.train.schedule", lambda c: c.defense.name == "abl",
     "ABL's schedules: abl.isolation_lr and abl.unlearning_lr are constant, abl.finetune_lr drops at "
     "abl.finetune_lr_boundaries"),
    ("config.train.lr_boundaries", lambda c: c.defense.name == "abl",
     "ABL's fine-tuning drops its lr at abl.finetune_lr_boundaries"),
    ("config.train.lr_boundaries", lambda c: c.train.schedule != "step",
     "it applies to train.schedule=step only"),
    ("config.abl.joint_", lambda c: not _joint(c), "it applies to abl.unlearning_mode=joint only"),
    ("config.abl.contradict_factor", lambda c: not _distills(c),
     _DISTILLED),
    ("config.abl.disown_below", lambda c: not _distills(c),
     _DISTILLED),
    ("config.abl.class_outlier_z", lambda c: not _distills(c),
     _DISTILLED),
    ("config.abl.class_outlier_z", lambda c: not c.abl.disown_below,
     "it applies with abl.disown_below > 0 only (it disowns)"),
    ("config.abl.class_outlier_below", lambda c: not _outliers(c),
     "it applies where outlier labels are looked for (abl.class_outlier_z > 0, abl.disown_below > 0, a gauge "
     "that distills the pool)"),
    ("config.abl.class_outlier_ratio", lambda c: not _outliers(c) or not tuple(c.abl.class_outlier_below),
     "it applies where outlier labels are looked for at the levels of abl.class_outlier_below (abl.class_outlier_z "
     "> 0, abl.disown_below > 0, a gauge that distills the pool)"),
    ("config.abl.flagged_rejected", lambda c: not _outliers(c),
     "it applies where outlier labels are looked for (abl.class_outlier_z > 0, abl.disown_below > 0, a gauge "
     "that distills the pool)"),
    ("config.abl.flagged_doubted", lambda c: not _outliers(c),
     "it applies where outlier labels are looked for (abl.class_outlier_z > 0, abl.disown_below > 0, a gauge "
     "that distills the pool)"),
    ("config.abl.flagged_unsure", lambda c: not (_outliers(c) and c.abl.unsure == "drop"),
     "it applies where outlier labels are looked for (abl.class_outlier_z > 0, abl.disown_below > 0, a gauge "
     "that distills the pool) and the pool's unsure examples stay out (abl.unsure='drop')"),
    ("config.abl.calibrate_flagged", lambda c: not (_outliers(c) and c.abl.gauge_epochs),
     "it applies where a gauge looks for outlier labels (abl.gauge_epochs > 0, abl.class_outlier_z > 0, "
     "abl.disown_below > 0, a gauge that distills the pool)"),
    ("config.abl.spectral_judged", lambda c: not (_outliers(c) and c.abl.kept_out == "distill"
                                                  and (c.abl.spectral_skew or c.abl.spectral_kurtosis)),
     "it applies where spectral signatures run (abl.spectral_skew or abl.spectral_kurtosis > 0) and outlier labels "
     "are looked for (abl.class_outlier_z > 0, abl.disown_below > 0)"),
    ("config.abl.pool_outlier_z", lambda c: not _outliers(c),
     "it applies where outlier labels are looked for (abl.class_outlier_z > 0, abl.disown_below > 0, a gauge "
     "that distills the pool)"),
    ("config.abl.regauge", lambda c: not (_outliers(c) and c.abl.gauge_epochs),
     "it applies with a gauge (abl.gauge_epochs > 0) that distills the pool and looks for outlier labels "
     "(abl.class_outlier_z > 0, abl.disown_below > 0)"),
    ("config.abl.regauge_", lambda c: not (_outliers(c) and c.abl.gauge_epochs and c.abl.regauge),
     "it applies where a second gauge can train (abl.regauge=True, abl.gauge_epochs > 0, abl.class_outlier_z > 0, "
     "abl.disown_below > 0, a gauge that distills the pool)"),
    ("config.abl.relearned_", lambda c: not (_outliers(c) and c.abl.gauge_epochs and c.abl.relearned_at
                                            and c.abl.finetune_epochs >= 2),
     "it applies where a gauge distills the pool and outlier labels are looked for (abl.gauge_epochs > 0, "
     "abl.class_outlier_z > 0, abl.disown_below > 0), with abl.relearned_at > 0 and a fine-tuning epoch after the "
     "check (abl.finetune_epochs >= 2)"),
    *((f"config.abl.{test}$", lambda c: not _disowns(c), _SPECTRAL)
      for test in ("spectral_skew", "spectral_kurtosis", "spectral_bimodality", "spectral_pursuit")),
    ("config.abl.spectral_kurtosis_z", lambda c: not (_disowns(c) and _outliers(c) and c.abl.gauge_epochs),
     "it applies where a gauge (abl.gauge_epochs > 0) judges a pool whose every example trains toward its "
     "probabilities and looks for outlier labels (abl.class_outlier_z > 0, abl.disown_below > 0)"),
    ("config.abl.spectral_tail", lambda c: not (_disowns(c) and (c.abl.spectral_skew or c.abl.spectral_pursuit)
                                                or c.abl.candidate_triggers),
     "it applies with abl.spectral_skew or abl.spectral_pursuit > 0 where every pool example trains toward the "
     "judge's probabilities, or with abl.candidate_triggers > 0"),
    ("config.abl.spectral_pursuit_dims", lambda c: not (_disowns(c) and c.abl.spectral_pursuit
                                                        or c.abl.candidate_triggers),
     "it applies with abl.spectral_pursuit > 0 where every pool example trains toward the judge's probabilities, "
     "or with abl.candidate_triggers > 0"),
    ("config.abl.candidate_scale", lambda c: not c.abl.candidate_triggers,
     "it applies with abl.candidate_triggers > 0"),
    *((f"config.abl.gauge_{field}$", lambda c: not (c.abl.gauge_epochs and c.abl.return_rule == "agree"),
       "it applies with a gauge (abl.gauge_epochs > 0, abl.return_rule='agree')")
      for field in ("downsample", "drop", "mix")),
    *((f"config.abl.gauge_drop_{field}$",
       lambda c: not (c.abl.gauge_epochs and c.abl.return_rule == "agree" and c.abl.gauge_drop),
       "it applies with abl.gauge_drop > 0 and a gauge (abl.gauge_epochs > 0, abl.return_rule='agree')")
      for field in ("cap", "epochs")),
    ("config.abl.own_above", lambda c: not _distills(c),
     _DISTILLED),
    ("config.abl.unsure", lambda c: not _distills(c),
     _DISTILLED),
    ("config.abl.stop_accuracy", lambda c: c.abl.unlearning_stop == "none",
     "it applies with abl.unlearning_stop=isolated_accuracy only"),
    ("config.data.name", lambda c: c.data.source != "tfds", "it applies to data.source=tfds only"),
    ("config.data.tfds_data_dir", lambda c: c.data.source != "tfds", "it applies to data.source=tfds only"),
    ("config.data.path", lambda c: c.data.source != "folder", "it applies to data.source=folder only"),
    ("config.data.cache_dir", lambda c: c.data.source != "folder", "it applies to data.source=folder only"),
    ("config.data.synthetic_", lambda c: c.data.source != "synthetic", "it applies to data.source=synthetic only"),
    ("config.data.image_size", lambda c: c.data.source != "synthetic", "it applies to data.source=synthetic only"),
    ("config.attack.alpha", lambda c: c.attack.name != "blend", "it applies to attack.name=blend only"),
    ("config.attack.pattern", lambda c: c.attack.name != "blend", "it applies to attack.name=blend only"),
    ("config.attack.delta", lambda c: c.attack.name != "sig", "it applies to attack.name=sig only"),
    ("config.attack.freq", lambda c: c.attack.name != "sig", "it applies to attack.name=sig only"),
    ("config.attack.", lambda c: c.attack.name == "none", "attack.name=none poisons nothing"),
)


def unused_overrides(config: ml_collections.ConfigDict, paths: Iterable[str]) -> list[tuple[str, str]]:
  """(field, what applies instead) for each field in `paths` that this run does not use."""
  out = []
  for path in paths:
    for prefix, ignored, instead in _RULES:
      matches = path == prefix[:-1] if prefix.endswith("$") else path.startswith(prefix)
      if matches and ignored(config):
        if path == "config.attack.name" or path == "config.defense.name":
          continue
        out.append((path, instead))
        break
  return out


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is a mistake in the command, config, workdir or data (one line), not a bug (a traceback)."""
  if isinstance(e, USER_ERRORS):
    return True
  # Config validation everywhere raises ValueError naming the field (config.<group>.<field>=...).
  return isinstance(e, (ValueError, KeyError)) and "config." in str(e)


def one_line(e: BaseException) -> str:
  """The error's message on one line."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(text.split()) or type(e).__name__


def shown_record(record: logging.LogRecord) -> bool:
  """Whether launch.py shows a log record: orbax's warnings and errors only, and no traceback of a Ctrl-C."""
  if record.exc_info and record.exc_info[0] is KeyboardInterrupt:
    return False  # Orbax logs a checkpoint wait cut short by Ctrl-C with its traceback; launch.py prints one line.
  return "orbax" not in record.pathname or record.levelno >= logging.WARNING


INTERRUPT_REPEAT_S = 1.0  # After Ctrl-C, KeyboardInterrupt is raised again this often until it is caught.


@contextlib.contextmanager
def interrupts_repeated(repeat_s: float = INTERRUPT_REPEAT_S) -> Iterator[None]:
  """Ctrl-C inside raises KeyboardInterrupt, and again every `repeat_s` seconds (SIGALRM) until the block exits.

  Python drops an exception raised inside a garbage-collection callback ("Exception ignored in"), and jax runs
  one (_xla_gc_callback): a Ctrl-C landing there would otherwise be lost and the run would go on.
  """
  def handler(signum, frame):
    del signum, frame
    signal.setitimer(signal.ITIMER_REAL, repeat_s)
    raise KeyboardInterrupt

  def unraisable(info):  # The dropped one is raised again: no "Exception ignored" traceback for it.
    if info.exc_type is not KeyboardInterrupt:
      hook(info)

  hook = sys.unraisablehook
  previous = signal.signal(signal.SIGINT, handler), signal.signal(signal.SIGALRM, handler)
  sys.unraisablehook = unraisable
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGALRM, previous[1])
    sys.unraisablehook = hook
