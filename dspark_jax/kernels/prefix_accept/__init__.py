"""Chain rejection sampling (accept test, first rejection, residual / bonus draw) fused.

`prefix_accept` (sampled) and `greedy_accept` dispatch like every op here
(`kernels.dispatch`): "xla" is the pure-jnp `reference.py`, "pallas" the kernel of
`pallas.py` (interpreted on CPU).
"""

from dspark_jax.kernels.prefix_accept.api import AUTO_ON, COMPILED_ON, choose, greedy_accept, prefix_accept

__all__ = ["prefix_accept", "greedy_accept", "choose", "COMPILED_ON", "AUTO_ON"]
