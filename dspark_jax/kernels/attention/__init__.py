"""Attention over key segments (caches, draft blocks): one entry point, several backends.

`attention(q, *segments, ...)` and the packed-verify `ragged_attention(q, cache, k, v, ...)`
dispatch on `implementation` (argument, else the `DSPARK_KERNELS` environment variable, else
"auto"): "xla" is the pure-jnp reference (`reference.py`), which every other backend is
tested against; "pallas" the flash-attention style kernel of `pallas.py` (interpreted on CPU).
"""

from dspark_jax.kernels.attention.api import (AUTO_ON, COMPILED_ON, IMPLEMENTATIONS, attention,
                                              choose, prefix_spans, ragged_attention)
from dspark_jax.kernels.attention.reference import MASK_VALUE, KV, Block

__all__ = ["attention", "ragged_attention", "prefix_spans", "choose", "KV", "Block",
           "MASK_VALUE", "IMPLEMENTATIONS", "COMPILED_ON", "AUTO_ON"]
