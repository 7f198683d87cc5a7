"""Optional offline target-feature cache (tensorstore zarr, bfloat16).

Online features (the default) recompute the frozen target inside every train step, which
is what removes DeepSpec's ~38 TB cache. When the same data is trained on many times
(several drafts, many epochs) on a small machine, caching the features once can be
cheaper: this writes, per tokenised sample, the tapped layers `[S, C]` and the final
hidden state `[S, D]` (DeepSpec stores the same two tensors), padded to `seq_len`.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dspark_jax.training import data as data_lib


def estimate_bytes(num_samples: int, seq_len: int, num_taps: int, hidden: int) -> int:
  """Bytes on disk: (taps + final hidden) x seq_len x bf16 per sample."""
  return num_samples * seq_len * (num_taps + 1) * hidden * 2


def _open(path: str, shape=None, create=False):
  import tensorstore as ts
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
  if create:
    spec["metadata"] = {"dtype": "bfloat16", "shape": list(shape),
                        "chunks": [1] + list(shape[1:])}
    return ts.open(spec, create=True, delete_existing=True).result()
  return ts.open(spec).result()


def write_cache(target, dcfg, tokens_path: str, cache_dir: str, *, seq_len: int,
                batch_size: int = 8, progress: bool = True) -> str:
  """Runs the target over every tokenised sample and stores its features."""
  from dspark_jax.generation import bucket  # noqa: F401  (kept for symmetry with serving)
  data = data_lib.load_tokenized(tokens_path)
  n = len(data)
  taps = tuple(dcfg.target_layer_ids)
  d = target.config.hidden_size
  width = (len(taps) + 1) * d
  size = estimate_bytes(n, seq_len, len(taps), d)
  print(f"[features] caching {n} samples x {seq_len} tokens x {len(taps)}+1 layers x {d} "
        f"(bf16): {size / 2**30:.2f} GiB -> {cache_dir}", file=sys.stderr, flush=True)
  os.makedirs(cache_dir, exist_ok=True)
  store = _open(os.path.join(cache_dir, "features.zarr"), (n, seq_len, width), create=True)
  fwd = jax.jit(lambda p, t: _features(target.graphdef, p, t, taps))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc="features", unit="sample")
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    toks = np.zeros((batch_size, seq_len), np.int32)
    for j, i in enumerate(idx):
      t, _ = data.sample(int(i))
      t = t[:seq_len]
      toks[j, :len(t)] = t
    feats = np.asarray(jax.device_get(fwd(target.params, jnp.asarray(toks))))
    store[int(idx[0]):int(idx[-1]) + 1].write(feats[:len(idx)]).result()
    if bar is not None:
      bar.update(len(idx))
  if bar is not None:
    bar.close()
  with open(os.path.join(cache_dir, "manifest.json"), "w") as f:
    json.dump({"version": 1, "num_samples": n, "seq_len": seq_len, "target_layer_ids": list(taps),
               "hidden_size": d, "dtype": "bfloat16", "target": target.path,
               "tokens": os.path.abspath(tokens_path)}, f, indent=2)
  return cache_dir


def _features(graphdef, params, tokens, taps):
  from flax import nnx
  out = nnx.merge(graphdef, params)(tokens, taps=taps, compute_logits=False)
  return jnp.concatenate([out.taps, out.hidden], axis=-1).astype(jnp.bfloat16)


class FeatureCache:
  def __init__(self, cache_dir: str):
    with open(os.path.join(cache_dir, "manifest.json")) as f:
      self.manifest = json.load(f)
    self.store = _open(os.path.join(cache_dir, "features.zarr"))
    self.num_taps = len(self.manifest["target_layer_ids"])
    self.hidden = self.manifest["hidden_size"]

  def read(self, indices: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [np.asarray(self.store[int(i), :seq_len].read().result()) for i in indices]
    arr = np.stack(rows).astype(np.float32)
    c = self.num_taps * self.hidden
    return arr[..., :c], arr[..., c:]


def open_cache(cache_dir: str) -> FeatureCache:
  if not os.path.exists(os.path.join(cache_dir, "manifest.json")):
    raise FileNotFoundError(f"no feature cache at {cache_dir}: run --mode=cache_features")
  return FeatureCache(cache_dir)


class WithFeatures:
  """Wraps a BatchIterator, adding cached `taps` / `hidden` for each batch's samples."""

  def __init__(self, batches, cache: FeatureCache):
    self.batches = batches
    self.cache = cache
    if cache.manifest["num_samples"] != batches.data.offsets.shape[0] - 1:
      raise ValueError("feature cache and tokenized data have different sample counts; "
                       "rebuild the cache (--mode=cache_features)")

  @property
  def steps_per_epoch(self):
    return self.batches.steps_per_epoch

  def state(self):
    return self.batches.state()

  def restore(self, state):
    self.batches.restore(state)

  def __iter__(self):
    return self

  def __next__(self):
    b = next(self.batches)
    taps, hidden = self.cache.read(b["sample_index"], b["tokens"].shape[1])
    return dict(b, taps=taps, hidden=hidden)
