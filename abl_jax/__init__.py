"""abl-jax: Anti-Backdoor Learning (Li et al., NeurIPS 2021) in JAX/Flax.

Importing the package selects XLA's own CPU convolution kernels (abl_jax/xla_flags.py) unless XLA_FLAGS or
ABL_JAX_KEEP_YNNPACK=1 says otherwise, so that every entry point (launch.py, python -m abl_jax.report, the
benchmarks) trains with the same kernels: attack models trained once and cached (the input-aware generators)
come out otherwise different, and so does the poisoned data (docs/input_aware.md).
"""
from abl_jax import xla_flags as _xla_flags

_xla_flags.prefer_xla_cpu_convolutions()

__version__ = "0.1.0"
