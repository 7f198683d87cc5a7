"""dspark-jax Pallas kernels, each beside a pure-jnp reference and behind a dispatcher.

Per op: `reference.py` (the spec), `pallas.py` (the kernel, `interpret=` for CPU) and
`api.py` (the dispatcher, `dspark_jax.kernels.dispatch`: `DSPARK_KERNELS=auto|xla|pallas`). Ops:
`attention` (segment attention and the ragged packed-verify entry), `markov_sampler`,
`prefix_accept`, `tree_accept`.

It lives inside `dspark_jax`: a top-level `kernels` package shadowed Hugging Face's
`kernels`, which transformers (>= 5.25) imports.
"""
