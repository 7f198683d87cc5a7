"""HF checkpoint <-> NNX state mapping for the target decoder (no torch).

Our module tree mirrors HF names, so the name map is mechanical: a param at
`model/layers/3/self_attn/q_proj/kernel` is HF `model.layers.3.self_attn.q_proj.weight`.
Values differ only in layout: HF Linear weights are `[out, in]` with heads flattened;
ours are `[in..., out...]` with heads split (`q_proj` `[D, N, H]`, `o_proj` `[N, H, D]`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from dspark_jax.checkpoints.safetensors_io import TensorReader

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# HF `[out, in]` weights whose *input* spans two of our axes.
_TWO_INPUT_AXES = ("o_proj",)


class CheckpointMismatchError(ValueError):
  """Tensor names or shapes in a checkpoint do not match the model."""


def hf_key(path: Sequence, prefix: str = "") -> str:
  """NNX state path -> HF tensor name."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  if leaf in _LEAF_NAMES:
    parts[-1] = _LEAF_NAMES[leaf]
  return prefix + ".".join(parts)


def _in_axes(path: Sequence) -> int:
  return 2 if any(str(p) in _TWO_INPUT_AXES for p in path) else 1


def to_jax_layout(path: Sequence, value: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """HF tensor -> our layout of `shape`."""
  leaf = str(path[-1])
  if leaf == "kernel":
    return np.ascontiguousarray(value.T).reshape(shape)
  return value.reshape(shape)


def to_hf_layout(path: Sequence, value: np.ndarray) -> np.ndarray:
  """Our layout -> HF tensor (inverse of `to_jax_layout`)."""
  leaf = str(path[-1])
  if leaf == "kernel":
    n_in = _in_axes(path)
    rows = math.prod(value.shape[:n_in])
    return np.ascontiguousarray(value.reshape(rows, -1).T)
  return value


def load_into(model_abstract: nnx.Module, path: str | os.PathLike, *, dtype,
              prefix: str = "", ignore: Iterable[str] = (), shardings=None,
              reader: TensorReader | None = None) -> nnx.Module:
  """Fills an abstract (eval_shape'd) NNX module from an HF safetensors directory.

  Args:
    model_abstract: module whose variables are ShapeDtypeStructs.
    path: HF directory.
    dtype: floating dtype of the loaded params.
    prefix: prepended to every HF name (e.g. "" for `model.layers...`).
    ignore: regexes of checkpoint tensors that are allowed to be unused.
    shardings: optional pytree of NamedSharding matching the module state.

  Raises:
    CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor.
  """
  graphdef, state = nnx.split(model_abstract)
  flat = list(nnx.to_flat_state(state))
  flat_shardings = None
  if shardings is not None:
    flat_shardings = [s for _, s in nnx.to_flat_state(shardings)] if isinstance(
        shardings, nnx.State) else jax.tree.leaves(shardings)
  own = reader is None
  reader = reader or TensorReader(path)
  try:
    names = {hf_key(p, prefix): i for i, (p, _) in enumerate(flat)}
    present = set(reader.keys())
    ignore_re = [re.compile(r) for r in ignore]
    missing = sorted(set(names) - present)
    unexpected = sorted(k for k in present - set(names)
                        if not any(r.fullmatch(k) for r in ignore_re))
    problems = []
    if missing:
      problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    out = []
    for name, i in names.items():
      if name not in present:
        continue
      p, var = flat[i]
      want = var.get_value().shape
      have = reader.shape(name)
      if math.prod(have) != math.prod(want):
        problems.append(f"{name}: checkpoint shape {have} does not fit model shape {want}")
    if problems:
      raise CheckpointMismatchError(f"checkpoint {os.fspath(path)} does not match the model:\n  "
                                    + "\n  ".join(problems))
    for name, i in names.items():
      p, var = flat[i]
      want = var.get_value()
      value = to_jax_layout(p, reader.get(name), want.shape)
      target_dtype = dtype if np.issubdtype(want.dtype, np.floating) else want.dtype
      value = value.astype(target_dtype)
      arr = (jax.device_put(value, flat_shardings[i]) if flat_shardings is not None
             else jax.device_put(value))
      out.append((p, var.replace(arr)))
  finally:
    if own:
      reader.close()
  return nnx.merge(graphdef, nnx.from_flat_state(out))


def export_state(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
  """NNX module -> {HF name: numpy array in HF layout}."""
  _, state = nnx.split(module)
  return {hf_key(p, prefix): to_hf_layout(p, np.asarray(jax.device_get(v.get_value())))
          for p, v in nnx.to_flat_state(state)}
