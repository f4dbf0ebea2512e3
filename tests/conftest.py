"""Test setup: two simulated CPU devices, and one compilation cache for the whole session."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402  (after XLA_FLAGS: the device count is read when jax starts)

# Runs in different tests build the same steps; compile each once per session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="abl_jax_test_xla_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
