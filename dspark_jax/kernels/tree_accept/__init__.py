"""Token-tree acceptance (greedy walk, multi-draft recursive rejection sampling) fused.

`tree_accept` (sampled) and `greedy_tree_accept` dispatch like every op here
(`kernels.dispatch`); `TreeShape` is the static tree both take.
"""

from dspark_jax.kernels.tree_accept.api import AUTO_ON, COMPILED_ON, choose, greedy_tree_accept, tree_accept
from dspark_jax.kernels.tree_accept.reference import TreeShape

__all__ = ["tree_accept", "greedy_tree_accept", "choose", "TreeShape", "COMPILED_ON", "AUTO_ON"]
