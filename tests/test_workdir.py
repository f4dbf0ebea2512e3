"""The workdir: checks before any work, the lock, atomic writes, damaged files, --overwrite's clean-up."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from abl_jax import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_regular_file_is_refused(tmp_path):
  (tmp_path / "run").write_text("notes")
  with pytest.raises(workdir.WorkdirError, match=r"run is a file, not a directory"):
    workdir.check(str(tmp_path / "run"))
  assert (tmp_path / "run").read_text() == "notes"
  with pytest.raises(workdir.WorkdirError, match=r"cannot be created: .*run is a file"):
    workdir.check(str(tmp_path / "run" / "sub"))


@pytest.fixture
def read_only(tmp_path):
  """A read-only directory: a read-only tmpfs as root (root writes through file modes), else mode 0o555."""
  path = tmp_path / "ro"
  path.mkdir()
  if os.geteuid() == 0:
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(path)], capture_output=True).returncode:
      pytest.skip("root cannot mount a read-only tmpfs here")
    yield path
    subprocess.run(["umount", str(path)], check=True)
  else:
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


def test_a_read_only_workdir_is_refused(read_only):
  with pytest.raises(workdir.WorkdirError, match=r"the workdir is not writable"):
    workdir.check(str(read_only))
  with pytest.raises(workdir.WorkdirError, match=r"where it would be created, is not writable"):
    workdir.check(str(read_only / "new"))


def test_a_writable_workdir_passes_and_is_left_as_it_was(tmp_path):
  workdir.check(str(tmp_path / "new" / "run"))
  workdir.check(str(tmp_path))
  assert os.listdir(tmp_path) == []


def _holder(path) -> subprocess.Popen:
  """A process that takes the lock of `path` and keeps it until killed."""
  code = ("import sys, time; from abl_jax import workdir\n"
          "with workdir.lock(sys.argv[1]):\n  print('held', flush=True); time.sleep(120)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
  proc = _holder(tmp_path)
  try:
    t0 = time.perf_counter()
    with pytest.raises(workdir.WorkdirError, match=rf"in use by pid {proc.pid} on host .*; wait for it to finish or stop it"):
      with workdir.lock(str(tmp_path)):
        pass
    assert time.perf_counter() - t0 < 5
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid  # The holder's lock is untouched.
  finally:
    proc.terminate()
    proc.wait()


def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path, caplog):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(tmp_path / ".lock")
  with caplog.at_level(logging.WARNING):
    with workdir.lock(str(tmp_path)):
      assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert f"taking over the lock left by pid {proc.pid}" in caplog.text
  assert not os.path.exists(tmp_path / ".lock")


def test_the_lock_is_released_on_an_error_and_a_directory_it_made_removed(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir.lock(str(tmp_path / "new")):
      raise RuntimeError("boom")
  assert not os.path.exists(tmp_path / "new")
  (tmp_path / "run").mkdir()
  with pytest.raises(KeyboardInterrupt):
    with workdir.lock(str(tmp_path / "run")):
      raise KeyboardInterrupt
  assert os.listdir(tmp_path / "run") == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "results.json")
  workdir.write_json(path, {"a": 1})
  with pytest.raises(TypeError):
    workdir.write_json(path, {"a": object()})  # json.dump fails half-way through.
  assert json.loads(open(path).read()) == {"a": 1}
  assert os.listdir(tmp_path) == ["results.json"]
  workdir.write_npz(str(tmp_path / "x.npz"), a=np.arange(3))
  np.testing.assert_array_equal(workdir.load_npz(str(tmp_path / "x.npz"))["a"], np.arange(3))


def test_damaged_files_are_named(tmp_path):
  (tmp_path / "results.json").write_text('{"clean_accuracy": 0.5')
  with pytest.raises(workdir.DamagedFileError, match=r"results\.json is damaged \(JSONDecodeError.*delete it"):
    workdir.read_json(str(tmp_path / "results.json"))
  workdir.write_npz(str(tmp_path / "isolation.npz"), scores=np.zeros(1000))
  blob = (tmp_path / "isolation.npz").read_bytes()
  (tmp_path / "isolation.npz").write_bytes(blob[:len(blob) // 2])
  with pytest.raises(workdir.DamagedFileError, match=r"isolation\.npz is damaged \(BadZipFile"):
    workdir.load_npz(str(tmp_path / "isolation.npz"))


def test_a_line_cut_off_by_a_kill_is_skipped_and_the_next_record_starts_a_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  workdir.append_jsonl(path, {"epoch": 1})
  with open(path, "a") as f:
    f.write('{"epoch": 2, "lo')  # Killed mid-write.
  workdir.append_jsonl(path, {"epoch": 2})
  assert workdir.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


def test_remove_outputs_deletes_every_output_and_keeps_other_files(tmp_path):
  for name in ("results.json", "metrics.jsonl", "isolation.npz", "curves.png", "isolation.png", "gallery.png",
               "examples.npz", "results.json.tmp123", "notes.txt"):
    (tmp_path / name).write_text("x")
  for d in ("checkpoints/3", "checkpoints.damaged/4", "before_unlearning/6"):
    (tmp_path / d).mkdir(parents=True)
  workdir.remove_outputs(str(tmp_path))
  assert os.listdir(tmp_path) == ["notes.txt"]
