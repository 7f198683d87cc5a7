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


def _schedule(lengths: np.ndarray, batch_size: int, seq_len: int, step: int) -> list:
  """Batches of sample indices sorted by length, each with its padded length (a multiple of
  `step`, at most `seq_len`): short samples are not run at the full `seq_len`."""
  order = np.argsort(np.minimum(lengths, seq_len), kind="stable")
  out = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    longest = int(min(lengths[idx].max(), seq_len))
    out.append((idx, min(seq_len, -(-longest // step) * step)))
  return out


def write_cache(target, dcfg, tokens_path: str, cache_dir: str, *, seq_len: int,
                batch_size: int = 8, length_step: int = 32, progress: bool = True) -> str:
  """Runs the target over every tokenised sample and stores its features (resumable).

  Samples run in length-sorted batches padded to a multiple of `length_step` (one compiled
  program per padded length); positions past a sample's padded length are written as zeros
  (no loss or attention reads them). After each batch `progress.json` records how many batches of
  this fixed schedule are on disk, so a killed run resumes where it stopped; the manifest
  is written last and marks the cache complete.
  """
  data = data_lib.load_tokenized(tokens_path)
  n = len(data)
  taps = tuple(dcfg.target_layer_ids)
  d = target.config.hidden_size
  width = (len(taps) + 1) * d
  size = estimate_bytes(n, seq_len, len(taps), d)
  os.makedirs(cache_dir, exist_ok=True)
  store_path = os.path.join(cache_dir, "features.zarr")
  progress_path = os.path.join(cache_dir, "progress.json")
  schedule = _schedule(np.asarray(data.lengths), batch_size, seq_len, length_step)
  key = {"num_samples": n, "seq_len": seq_len, "target_layer_ids": list(taps),
         "batch_size": batch_size, "length_step": length_step,
         "tokens": int(data.offsets[-1])}
  done = 0
  if os.path.exists(progress_path) and os.path.exists(store_path):
    with open(progress_path) as f:
      prev = json.load(f)
    if prev.get("key") == key:
      done = int(prev["batches_done"])
  if done:
    store = _open(store_path)
    print(f"[features] resuming at batch {done}/{len(schedule)} -> {cache_dir}",
          file=sys.stderr, flush=True)
  else:
    if os.path.exists(os.path.join(cache_dir, "manifest.json")):
      os.remove(os.path.join(cache_dir, "manifest.json"))  # incomplete until rewritten
    print(f"[features] caching {n} samples x <= {seq_len} tokens x {len(taps)}+1 layers x {d} "
          f"(bf16): <= {size / 2**30:.2f} GiB -> {cache_dir}", file=sys.stderr, flush=True)
    store = _open(store_path, (n, seq_len, width), create=True)
  fwd = jax.jit(lambda p, t: _features(target.graphdef, p, t, taps))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, initial=sum(len(i) for i, _ in schedule[:done]), desc="features",
               unit="sample")
  for b in range(done, len(schedule)):
    idx, length = schedule[b]
    toks = np.zeros((batch_size, length), np.int32)
    for j, i in enumerate(idx):
      t, _ = data.sample(int(i))
      t = t[:length]
      toks[j, :len(t)] = t
    feats = np.asarray(jax.device_get(fwd(target.params, jnp.asarray(toks))))
    # Whole rows (zero tail): a chunk is one sample, so a partial write would read it back.
    rows = np.zeros((len(idx), seq_len, width), feats.dtype)
    rows[:, :length] = feats[:len(idx)]
    writes = [store[int(i)].write(rows[j]) for j, i in enumerate(idx)]
    for w in writes:
      w.result()
    with open(progress_path + ".tmp", "w") as f:
      json.dump({"key": key, "batches_done": b + 1, "batches": len(schedule)}, f)
    os.replace(progress_path + ".tmp", progress_path)
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
    # All reads are issued before any is waited on: tensorstore runs them concurrently.
    reads = [self.store[int(i), :seq_len].read() for i in indices]
    rows = [np.asarray(r.result()) for r in reads]
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
