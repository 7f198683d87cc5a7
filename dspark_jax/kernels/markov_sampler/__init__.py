"""The Markov head's sequential block sampler: Z_k = U_k + W1[x_{k-1}] W2, x_k = argmax(score).

`markov_sample(...)` dispatches like every op here (`kernels.dispatch`): "xla" is the pure-jnp
`reference.py`, "pallas" the fused kernel of `pallas.py` (interpreted on CPU).
"""

from dspark_jax.kernels.markov_sampler.api import AUTO_ON, COMPILED_ON, choose, markov_sample

__all__ = ["markov_sample", "choose", "COMPILED_ON", "AUTO_ON"]
