"""End to end on synthetic data: a damaged checkpoint or result file, a held lock, --overwrite's clean-up."""
import os
import shutil
import subprocess
import sys

import pytest

from abl_jax import experiment, workdir
from smoke import config as smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("clean_accuracy", "attack_success_rate", "train_accuracy", "train_loss")


def _truncate_all(directory) -> None:
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_damaged_files_are_named_and_a_damaged_checkpoint_falls_back(runs, tmp_path, caplog):
  _, _, abl = runs
  work = tmp_path / "run"
  assert experiment.train_and_evaluate(smoke(), str(work), max_epochs=3) is None  # Checkpoints 2 and 3.
  shutil.copy(work / "isolation.npz", tmp_path / "isolation.npz")
  with open(work / "isolation.npz", "r+b") as f:
    f.truncate(os.path.getsize(work / "isolation.npz") // 2)
  kept = sorted(os.listdir(work / "checkpoints"))
  with pytest.raises(workdir.DamagedFileError, match=rf"{work}/isolation\.npz is damaged"):
    experiment.train_and_evaluate(smoke(), str(work))
  assert sorted(os.listdir(work / "checkpoints")) == kept == ["2", "3"]  # Nothing lost.
  shutil.copy(tmp_path / "isolation.npz", work / "isolation.npz")

  _truncate_all(work / "checkpoints" / "3")
  resumed = experiment.train_and_evaluate(smoke(), str(work))
  assert f"checkpoint 3 in {work}/checkpoints is damaged" in caplog.text
  assert "resuming from checkpoint 2" in caplog.text
  assert os.listdir(work / "checkpoints.damaged") == ["3"]  # Set aside, not deleted.
  for field in METRICS:
    assert resumed[field] == pytest.approx(abl[field], abs=1e-5), field


def test_a_run_in_a_locked_workdir_stops_at_once(tmp_path):
  code = ("import sys, time; from abl_jax import workdir\n"
          "with workdir.lock(sys.argv[1]):\n  print('held', flush=True); time.sleep(120)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(workdir.WorkdirError, match=rf"in use by pid {proc.pid}"):
      experiment.train_and_evaluate(smoke(), str(tmp_path))
    assert os.listdir(tmp_path) == [".lock"]
  finally:
    proc.terminate()
    proc.wait()


def test_overwrite_removes_every_output_of_the_old_run(runs, tmp_path):
  root, _, _ = runs
  work = tmp_path / "run"
  shutil.copytree(root / "abl", work)
  for picture in ("curves.png", "isolation.png", "gallery.png"):
    (work / picture).write_bytes(b"png")
  (work / "notes.txt").write_text("mine")
  experiment.train_and_evaluate(smoke(defense__name="none", train__epochs=1), str(work), overwrite=True)
  left = set(os.listdir(work))
  assert not left & {"isolation.npz", "isolation.json", "isolation.png", "gallery.png", "curves.png",
                     "before_unlearning", "unlearning_curve.json"}, left
  assert {"results.json", "config.json", "notes.txt"} <= left and ".lock" not in left
  assert workdir.read_json(str(work / "config.json"))["defense"]["name"] == "none"
