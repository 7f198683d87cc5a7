"""Dimension legend and array aliases used across dspark_jax.

Every docstring, einsum and comment in the project names dimensions with these
letters, so a shape reads the same everywhere:

  B  batch (rows / requests)
  T  query tokens in one call (prefill length, 1 for decode, 1 + P for verify)
  S  key/value length (cache capacity, or T in a full-sequence forward)
  N  query heads
  K  key/value heads (GQA groups); G = N // K query heads per kv head
  H  head dim
  D  model (hidden) dim
  F  MLP intermediate dim
  V  vocabulary
  L  layers
  P  draft block (gamma: tokens proposed per round)
  C  tapped target layers concatenated (C = len(target_layer_ids) * D)
  R  Markov head rank

`K` is the kv-head count, not the draft length: the draft length is `P`.
"""

from typing import Any

import jax

Array = jax.Array
PyTree = Any
