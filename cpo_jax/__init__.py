"""cpo_jax: preference optimisation in JAX (DPO family, Constrained Preference Optimization, RLHF)."""

__version__ = "0.1.0"
