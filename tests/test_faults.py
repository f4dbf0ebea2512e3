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
  for picture in ("curves.png", "isolation.png", "gallery.png", "judge.png", "spectral.png"):
    (work / picture).write_bytes(b"png")
  for decision in ("returned.npz", "regauged.npz", "relearned.npz", "epoch_scores.npz"):  # Read back on resume.
    (work / decision).write_bytes(b"npz")
  (work / "isolation_model" / "3").mkdir(parents=True)
  (work / "notes.txt").write_text("mine")
  experiment.train_and_evaluate(smoke(defense__name="none", train__epochs=1), str(work), overwrite=True)
  left = set(os.listdir(work))
  assert left == set(os.listdir(root / "none")) | {"notes.txt"}  # What a new run writes, and the user's file.
  assert workdir.read_json(str(work / "config.json"))["defense"]["name"] == "none"


def test_a_run_records_its_data_and_refuses_to_go_on_with_other_data(runs, tmp_path):
  root, none, abl = runs
  saved = workdir.read_json(str(root / "abl" / "data.json"))
  assert set(saved) == {"train", "test", "poisoned_test"} and saved == abl["data"]
  assert none["data"] == abl["data"]  # A pair's two runs saw the same poisoned data.
  work = tmp_path / "run"
  config = smoke(defense__name="none", train__epochs=2)
  assert experiment.train_and_evaluate(config, str(work), max_epochs=1) is None
  assert workdir.read_json(str(work / "data.json")) == saved
  # A cached attack model retrained since (the input-aware generators): another poisoned training set.
  workdir.write_json(str(work / "data.json"), {**saved, "train": "0" * 16})
  with pytest.raises(workdir.WorkdirError, match=r"holds a run on other data \(train differ from its data\.json\)"):
    experiment.train_and_evaluate(config, str(work))
  with pytest.raises(workdir.WorkdirError, match=r"on other data \(train differ"):
    experiment.evaluate_checkpoint(config, str(work))
  assert sorted(os.listdir(work / "checkpoints")) == ["1"]  # Nothing trained on the other data.
