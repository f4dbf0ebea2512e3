"""abl-jax: Anti-Backdoor Learning (Li et al., NeurIPS 2021) in JAX/Flax."""

__version__ = "0.1.0"
