"""Two real processes on localhost CPU (JAX's distributed runtime, gloo collectives) against the 1-process run.

The BadNets smoke config with the default defense runs on 1 process x 2 devices and on 2 processes x 1 device,
which must compute the same steps: same isolation, same metrics.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from abl_jax import distributed, experiment
from smoke import config as smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("clean_accuracy", "attack_success_rate", "clean_test_loss", "poisoned_test_loss", "train_accuracy",
           "train_loss")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(workdir: str, *, via_env: bool = False, timeout: int = 600) -> None:
  """Runs launch.py on the BadNets smoke config as processes 0 and 1 of one job; fails showing both outputs."""
  address = f"127.0.0.1:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if via_env:  # The coordinator from the standard environment variable (config.distributed.initialize=auto).
    env["JAX_COORDINATOR_ADDRESS"] = address
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "launch.py", "--config=configs/abl_badnets.py:smoke", f"--workdir={workdir}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
    if not via_env:
      cmd.append(f"--config.distributed.coordinator_address={address}")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      outputs.append(p.communicate()[0] + f"\n[killed after {timeout} s]")
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    shown = "\n".join(f"===== process {i} (exit {procs[i].returncode}) =====\n{out[-6000:]}"
                      for i, out in enumerate(outputs))
    pytest.fail(f"processes {failed} of the 2-process run failed (CPU collectives: jax_cpu_collectives_"
                f"implementation={getattr(jax.config, 'jax_cpu_collectives_implementation', None)!r}):\n{shown}")


def _lines(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one_process(default_run, tmp_path):
  one_dir, one = default_run  # 1 process x 2 devices.
  _launch_two(str(tmp_path / "two"))
  with open(tmp_path / "two" / "results.json") as f:
    two = json.load(f)
  assert two["versions"]["processes"] == 2 and two["versions"]["global_devices"] == 2
  one_iso, two_iso = np.load(one_dir / "isolation.npz"), np.load(tmp_path / "two" / "isolation.npz")
  np.testing.assert_array_equal(two_iso["isolated"], one_iso["isolated"])  # The global lowest losses.
  np.testing.assert_allclose(two_iso["scores"], one_iso["scores"], atol=1e-4)
  np.testing.assert_array_equal(two_iso["is_poisoned"], one_iso["is_poisoned"])  # The same poisoning.
  for field in METRICS:
    assert two[field] == pytest.approx(one[field], abs=1e-3), field
  # Written once: as many metric records as the 1-process run (a second writer would double them).
  assert len(_lines(tmp_path / "two" / "metrics.jsonl")) == len(_lines(one_dir / "metrics.jsonl"))
  assert two["config"]["distributed"]["num_processes"] == 2


def test_one_process_run_resumes_on_two(default_run, tmp_path):
  one_dir, one = default_run
  work = tmp_path / "resumed"
  shutil.copytree(one_dir, work)
  os.remove(work / "results.json")  # Interrupted after its last epoch: only the final evaluation is left.
  _launch_two(str(work), via_env=True)
  with open(work / "results.json") as f:
    resumed = json.load(f)
  # Each process scores its rows of every batch: a wrong restore on either one would change the metrics.
  for field in METRICS:
    assert resumed[field] == pytest.approx(one[field], abs=1e-3), field
  assert resumed["versions"]["processes"] == 2


def test_distributed_config_is_checked_and_ignored_by_the_workdir(runs):
  root, _, _ = runs
  with pytest.raises(ValueError, match=r"config\.distributed\.initialize='maybe' is unknown"):
    distributed.validate(smoke(distributed__initialize="maybe").distributed)
  with pytest.raises(ValueError, match=r"config\.distributed\.process_id=2 must be"):
    distributed.validate(smoke(distributed__num_processes=2, distributed__process_id=2).distributed)
  with pytest.raises(ValueError, match=r"config\.distributed\.coordinator_address='host' must be host:port"):
    distributed.validate(smoke(distributed__coordinator_address="host").distributed)
  assert not distributed.initialize(smoke(distributed__initialize="never").distributed)
  # Another process count is the same experiment; a config.json from before the group existed too.
  from abl_jax import experiment
  experiment.check_same_config(smoke(distributed__num_processes=4), str(root / "abl"))
  saved = json.load(open(root / "abl" / "config.json"))
  saved.pop("distributed")
  legacy = root / "legacy"
  legacy.mkdir()
  json.dump(saved, open(legacy / "config.json", "w"))
  experiment.check_same_config(smoke(), str(legacy))
