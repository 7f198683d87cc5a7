"""Logical-axis sharding: params and caches name their axes, one rules table maps
names to mesh axes `(data, fsdp, tensor)`.

A 1-device mesh is the default, so CPU, one GPU and a pod slice run the same code.
A logical axis whose size is not divisible by its mesh axes is replicated instead
(e.g. a single Gemma 4 global KV head on a 4-way tensor axis).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("cache_seq", None),
)

# Logical axes of one KV-cache entry, in `KVCache`'s `[B, K, S, H]` layout (kv heads before
# slots): rows over the batch axes, kv heads over tensor like the k/v projections that
# write them, so a verify step reads and writes its own shard without moving the cache.
CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")
# Keys are stored transposed, `[B, K, H, S]` (see `decoding.cache`).
KEY_CACHE_AXES = ("batch", "kv_heads", "head_dim", "cache_seq")


def mesh_dims(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> list[int]:
  """Axis sizes `[data, fsdp, tensor]` of `shape` (a mapping by axis name or 3 sizes) with
  its one allowed -1 filled from `num_devices`."""
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    dims = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    dims = [int(d) for d in shape]
    if len(dims) != 3:
      raise ValueError(f"mesh shape needs 3 entries {MESH_AXES}, got {dims}")
  if dims.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  if -1 in dims:
    known = math.prod(d for d in dims if d != -1)
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dims}")
    dims[dims.index(-1)] = num_devices // known
  return dims


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `(data, fsdp, tensor)`; one entry may be -1 (fill with remaining devices).

  Default: a 1-device mesh on the first device.
  """
  if shape is None:
    devices = list(devices or jax.devices())[:1]
    return Mesh(np.array(devices).reshape(1, 1, 1), MESH_AXES)
  devices = list(devices or jax.devices())
  dims = mesh_dims(shape, len(devices))
  n = math.prod(dims)
  if n > len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {n} devices, have {len(devices)}")
  return Mesh(np.array(devices[:n]).reshape(dims), MESH_AXES)


def spec_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec for an array with logical `axes` and `shape` on `mesh`."""
  if axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(axes, shape):
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and a not in used
                      and mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or size % ways:
      out.append(None)
      continue
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*out)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  value = var.get_value()
  axes = var.get_metadata().get("axes")
  if axes is not None and len(axes) != len(value.shape):
    raise ValueError(f"axes {axes} do not match shape {value.shape}")
  return NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """A pytree of NamedSharding with the structure of `state`'s leaves."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_sharding(mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES, *,
                   keys: bool = False) -> NamedSharding:
  """Layout of one cache entry: values `[B, K, S, H]` (CACHE_AXES) or, with `keys`, keys
  `[B, K, H, S]` (KEY_CACHE_AXES)."""
  return NamedSharding(mesh, spec_for(KEY_CACHE_AXES if keys else CACHE_AXES, shape, mesh,
                                      rules))


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES) -> NamedSharding:
  """Layout of per-row decode state `[B, ...]` (lengths, hidden seeds): rows over the batch
  axes like the cache they index, everything else replicated."""
  axes = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
