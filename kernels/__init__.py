"""dspark-jax Pallas kernels, each beside a pure-jnp reference and behind a dispatcher.

Per op: `reference.py` (the spec), `pallas.py` (the kernel, `interpret=` for CPU) and
`api.py` (the dispatcher, `kernels.dispatch`: `DSPARK_KERNELS=auto|xla|pallas`). Ops:
`attention` (reference only so far), `markov_sampler`, `prefix_accept`.

This is the project's own top-level `kernels` package (not PyPI's unrelated `kernels`).
"""
