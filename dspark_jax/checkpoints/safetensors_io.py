"""Lazy safetensors reading/writing over HF model directories (no torch).

A directory holds either `model.safetensors` or shards listed in
`model.safetensors.index.json`. `TensorReader` opens files on demand and reads one
tensor at a time as numpy (bfloat16 via ml_dtypes), so peak host memory is one
tensor, not the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class TensorReader(contextlib.AbstractContextManager):
  """Maps tensor names to the safetensors file holding them; reads lazily."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    index = os.path.join(self.path, INDEX_NAME)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self._file_of = {k: os.path.join(self.path, v) for k, v in weight_map.items()}
    else:
      files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {self.path}")
      self._file_of = {}
      for name in files:
        full = os.path.join(self.path, name)
        with safe_open(full, framework="numpy") as f:
          for k in f.keys():
            self._file_of[k] = full
    self._handles: dict[str, object] = {}
    self._orig: dict[str, str] = {}

  def rename(self, fn) -> "TensorReader":
    """Renames keys with `fn(name) -> new name | None` (None drops the tensor)."""
    file_of, orig = {}, {}
    for k, f in self._file_of.items():
      new = fn(k)
      if new is not None:
        file_of[new] = f
        orig[new] = self._orig.get(k, k)
    self._file_of, self._orig = file_of, orig
    return self

  def keys(self) -> list[str]:
    return list(self._file_of)

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def _handle(self, key: str):
    fname = self._file_of[key]
    if fname not in self._handles:
      self._handles[fname] = safe_open(fname, framework="numpy").__enter__()
    return self._handles[fname]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(self._orig.get(key, key)).get_shape())

  def get(self, key: str) -> np.ndarray:
    return self._handle(key).get_tensor(self._orig.get(key, key))

  def close(self):
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._handles.clear()

  def __exit__(self, *exc):
    self.close()
    return False


def save_tensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                 metadata: Mapping[str, str] | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `tensors` as `model.safetensors` (or shards + index above `max_shard_bytes`)."""
  os.makedirs(path, exist_ok=True)
  meta = {"format": "pt", **(metadata or {})}
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  total = sum(a.nbytes for a in arrays.values())
  if total <= max_shard_bytes:
    save_file(arrays, os.path.join(path, SINGLE_NAME), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k, a in arrays.items():
    if size and size + a.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = a
    size += a.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata=meta)
    weight_map.update({k: name for k in shard})
  with open(os.path.join(path, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  with TensorReader(path) as r:
    for k in r.keys():
      yield k, r.get(k)
