"""launch.py as a user meets it: one line and exit code 2 for a mistake, warnings for unused fields, Ctrl-C."""
import gc
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from abl_jax import cli
from configs import abl_badnets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/abl_badnets.py:smoke"


def _launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)


def _one_line(proc: subprocess.CompletedProcess) -> str:
  """The error line; asserts exit code 2 and no traceback."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("launch.py: ")]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


def test_unknown_field_names_close_matches(tmp_path):
  line = _one_line(_launch(SMOKE, f"--workdir={tmp_path}/run", "--config.train.epoch=3"))
  assert "unknown field config.train.epoch; did you mean config.train.epochs" in line
  assert not os.path.exists(tmp_path / "run")


def test_unknown_field_message_lists_the_group():
  config = abl_badnets.get_config("smoke")
  assert cli.unknown_field_message(config, "config.abl.gama").startswith(
      "unknown field config.abl.gama; did you mean config.abl.gamma")
  assert "the groups are abl, attack" in cli.unknown_field_message(config, "config.nope.x")


def test_bad_value_and_unused_field_one_line_after_the_warning(tmp_path):
  proc = _launch(SMOKE, f"--workdir={tmp_path}/run", "--config.train.learning_rate=0.05",
                 "--config.attack.poison_rate=2")
  assert _one_line(proc) == "launch.py: config.attack.poison_rate=2.0 must be in (0, 1]"
  assert ("--config.train.learning_rate is not used by this run: ABL's learning rates are abl.isolation_lr, "
          "abl.finetune_lr, abl.unlearning_lr") in proc.stderr
  assert not os.path.exists(tmp_path / "run")


def test_verbosity_1_shows_the_traceback(tmp_path):
  proc = _launch(SMOKE, f"--workdir={tmp_path}/run", "--config.attack.poison_rate=2", "--verbosity=1")
  assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_unused_overrides():
  abl = abl_badnets.get_config("smoke")
  assert [f for f, _ in cli.unused_overrides(abl, ["config.train.learning_rate", "config.train.epochs",
                                                   "config.abl.gamma", "config.data.path", "config.attack.delta"])] \
      == ["config.train.learning_rate", "config.train.epochs", "config.data.path", "config.attack.delta"]
  none = abl_badnets.get_config("smoke")
  none.defense.name = "none"
  assert cli.unused_overrides(none, ["config.abl.finetune_lr", "config.train.learning_rate"]) == [
      ("config.abl.finetune_lr", "the abl group applies to ABL runs only (--config.defense.name=abl); this run "
       "trains train.epochs at train.learning_rate")]
  paper = abl_badnets.get_config("smoke")
  paper.abl.return_rule = "none"  # No gauge: nothing is distilled, so contradiction and disowning do nothing.
  assert [f for f, _ in cli.unused_overrides(paper, ["config.abl.disown_below", "config.abl.contradict_factor",
                                                     "config.abl.own_above", "config.abl.unsure",
                                                     "config.abl.class_outlier_z", "config.abl.gamma"])] == [
      "config.abl.disown_below", "config.abl.contradict_factor", "config.abl.own_above", "config.abl.unsure",
      "config.abl.class_outlier_z"]
  no_gauge = abl_badnets.get_config("smoke")
  no_gauge.abl.gauge_epochs, no_gauge.abl.return_epoch = 0, 1  # Fine-tuning judges and distills the pool itself.
  assert cli.unused_overrides(no_gauge, ["config.abl.own_above", "config.abl.disown_below"]) == []
  assert cli.unused_overrides(abl_badnets.get_config("smoke"), ["config.abl.disown_below"]) == []
  no_disowning = abl_badnets.get_config("smoke")
  no_disowning.abl.disown_below = 0.0
  assert [f for f, _ in cli.unused_overrides(no_disowning, ["config.abl.class_outlier_z",
                                                           "config.abl.class_outlier_below"])] == [
      "config.abl.class_outlier_z", "config.abl.class_outlier_below"]
  assert cli.unused_overrides(abl_badnets.get_config("smoke"), ["config.abl.class_outlier_below"]) == []
  relabel = abl_badnets.get_config("smoke")
  relabel.abl.kept_out = "relabel"  # Spectral suspects are disowned through distilled targets, which relabel lacks.
  relabel.abl.candidate_triggers = 0.0  # (Candidate triggers are pursuit tails: they read spectral_tail too.)
  fields = ["config.abl.spectral_skew", "config.abl.spectral_tail", "config.abl.spectral_kurtosis"]
  assert [f for f, _ in cli.unused_overrides(relabel, fields)] == fields
  spectral = abl_badnets.get_config("smoke")
  spectral.abl.spectral_skew = 0.8
  spectral.abl.candidate_triggers = 0.0
  assert cli.unused_overrides(spectral, fields) == []
  spectral.abl.spectral_skew = 0.0  # The tail belongs to the skewness test alone.
  assert [f for f, _ in cli.unused_overrides(spectral, fields)] == ["config.abl.spectral_tail"]
  pursuit = ["config.abl.spectral_pursuit", "config.abl.spectral_pursuit_dims", "config.abl.spectral_tail"]
  assert [f for f, _ in cli.unused_overrides(spectral, pursuit)] == pursuit[1:]  # The pursuit test is off.
  spectral.abl.candidate_triggers = 0.5  # Candidate triggers are pursuit tails, whatever the tests.
  assert cli.unused_overrides(spectral, pursuit) == []
  relabel.abl.candidate_triggers = 0.5
  assert [f for f, _ in cli.unused_overrides(relabel, pursuit)] == ["config.abl.spectral_pursuit"]
  assert cli.unused_overrides(relabel, ["config.abl.candidate_scale"]) == []
  relabel.abl.candidate_triggers = 0.0
  assert [f for f, _ in cli.unused_overrides(relabel, ["config.abl.candidate_scale"])] == ["config.abl.candidate_scale"]
  gauged = abl_badnets.get_config("smoke")
  gauge_fields = ["config.abl.gauge_downsample", "config.abl.gauge_drop", "config.abl.gauge_mix"]
  assert cli.unused_overrides(gauged, gauge_fields) == []
  gauged.abl.gauge_epochs = 0
  assert [f for f, _ in cli.unused_overrides(gauged, gauge_fields + ["config.abl.gauge_epochs"])] == gauge_fields
  gauged.abl.gauge_epochs = 6
  assert [f for f, _ in cli.unused_overrides(gauged, ["config.abl.gauge_drop_cap"])] == ["config.abl.gauge_drop_cap"]
  gauged.abl.gauge_drop = 0.2
  assert cli.unused_overrides(gauged, ["config.abl.gauge_drop_cap"]) == []
  relearned = ["config.abl.relearned_at", "config.abl.relearned_above"]
  assert cli.unused_overrides(abl_badnets.get_config("smoke"), relearned) == []
  off = abl_badnets.get_config("smoke")
  off.abl.relearned_at = 0.0
  assert [f for f, _ in cli.unused_overrides(off, relearned)] == relearned
  one_epoch = abl_badnets.get_config("smoke")
  one_epoch.abl.finetune_epochs = 1  # No fine-tuning epoch would follow the check.
  assert [f for f, _ in cli.unused_overrides(one_epoch, relearned)] == relearned
  assert cli.override_paths(["x", "--config.train.epochs=3", "--config=c.py", "--config.abl.gamma", "1"]) == [
      "config.train.epochs", "config.abl.gamma"]


def test_workdir_that_is_a_file_and_a_missing_config(tmp_path):
  (tmp_path / "run").write_text("x")
  line = _one_line(_launch(SMOKE, f"--workdir={tmp_path}/run"))
  assert "is a file, not a directory" in line and (tmp_path / "run").read_text() == "x"
  line = _one_line(_launch("--config=configs/nope.py", f"--workdir={tmp_path}/w"))
  assert "configs/nope.py does not exist" in line and "repository root" in line


def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  work = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "launch.py", SMOKE, f"--workdir={work}", "--config.abl.finetune_epochs=40"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.exists(work / "isolation.npz"):  # Past two epochs.
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=180)  # Stopping takes seconds; generous for a loaded 2-core machine.
  assert proc.returncode == 130, err[-2000:]
  assert "launch.py: interrupted; rerun the same command to resume" in err and "Traceback" not in err
  assert not os.path.exists(work / ".lock") and os.listdir(work / "checkpoints")


def test_a_ctrl_c_lost_in_a_gc_callback_is_raised_again():
  def callback(phase, info):  # Like jax's _xla_gc_callback: Python reports and drops what it raises.
    del info
    if phase == "start":
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(10_000):  # Bytecodes for the signal handler to run in.
        pass

  caught, hook, before = [], sys.unraisablehook, signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup.
  with cli.interrupts_repeated(repeat_s=0.05):
    gc.callbacks.append(callback)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(callback)
    try:
      for _ in range(600):
        time.sleep(0.1)
    except KeyboardInterrupt:
      caught.append(True)
  assert caught
  assert signal.getsignal(signal.SIGINT) is before and sys.unraisablehook is hook  # Both restored.


def test_log_filter_hides_orbax_info_and_ctrl_c_tracebacks_only():
  def record(path: str, level: int, exc: type[BaseException] | None) -> logging.LogRecord:
    info = (exc, exc(), None) if exc else None
    return logging.LogRecord("absl", level, path, 1, "msg", (), info)

  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not cli.shown_record(record(orbax, logging.ERROR, KeyboardInterrupt))  # Ctrl-C mid-save.
  assert not cli.shown_record(record(orbax, logging.INFO, None))
  assert cli.shown_record(record(orbax, logging.ERROR, OSError))  # A real checkpoint failure stays.
  assert cli.shown_record(record(orbax, logging.WARNING, None))
  assert cli.shown_record(record("/abl_jax/schedule.py", logging.INFO, None))
