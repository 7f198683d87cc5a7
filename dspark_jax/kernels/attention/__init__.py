"""Attention over key segments (caches, draft blocks): one entry point, several backends.

`attention(q, *segments, ...)` dispatches on `implementation` (argument, else the
`DSPARK_KERNELS` environment variable, else "auto"): "xla" is the pure-jnp reference
(`reference.py`), which every other backend is tested against.
"""

from dspark_jax.kernels.attention.api import IMPLEMENTATIONS, attention, prefix_spans
from dspark_jax.kernels.attention.reference import KV, MASK_VALUE, Block

__all__ = ["attention", "prefix_spans", "KV", "Block", "MASK_VALUE", "IMPLEMENTATIONS"]
