"""Test setup: two simulated CPU devices, quicker compilation, and one compilation cache for the whole session."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# LLVM at its level 1 (XLA's default is 3): the smoke runs' programs compile faster, which is most of their
# time; the tests compare runs made under the same flags (subprocesses inherit them).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
from abl_jax import xla_flags  # noqa: E402

xla_flags.prefer_xla_cpu_convolutions()  # The kernels launch.py uses.

import jax  # noqa: E402  (after XLA_FLAGS: the device count is read when jax starts)

# Runs in different tests build the same steps; compile each once per session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="abl_jax_test_xla_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import pytest  # noqa: E402

import smoke  # noqa: E402  (tests/ is on sys.path)
from abl_jax import experiment  # noqa: E402


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
  """One no-defense run and one ABL run of the BadNets smoke config (trained once per session)."""
  root = tmp_path_factory.mktemp("runs")
  none = experiment.train_and_evaluate(smoke.config(defense__name="none"), str(root / "none"))
  abl = experiment.train_and_evaluate(smoke.config(), str(root / "abl"))
  return root, none, abl


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
  """The BadNets smoke config with the default defense (a gauge judges), trained once per session: (its workdir,
  its results). Tests read it, or copy it to change it."""
  root = tmp_path_factory.mktemp("default")
  return root / "abl", experiment.train_and_evaluate(smoke.default(), str(root / "abl"))
