"""dspark-jax Pallas kernels, each beside a pure-jnp reference and behind a dispatcher.

This is the project's own top-level `kernels` package (not PyPI's unrelated `kernels`).
"""
