"""har_jax: HAR / ELF early-exit training for long-tailed classification in JAX."""

__version__ = "0.1.0"
