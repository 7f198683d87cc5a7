"""Fixed-shape `[B, S]` training batches over a tokenised corpus, with exact resume."""

from __future__ import annotations

import os

import numpy as np

from dspark_jax.training.data.tokenize import TokenizedData, load_tokenized


class BatchIterator:
  """Endless iterator of shuffled fixed-shape batches over a tokenised corpus.

  Epoch e visits `samples_per_epoch = floor(N / B) * B` samples: a permutation drawn from
  `np.random.default_rng([seed, e])`, the last `N mod B` dropped (as DeepSpec's sampler does).
  With `bucket_window = k > 1`, each run of k*B permuted samples is sorted by length before being
  cut into batches, and those k batches are shuffled (same rng), so batches hold similar
  lengths (less padding) while the order stays a pure function of (seed, epoch).

  Each batch is a dict of numpy arrays:
    tokens int32 `[B, S]` (right-padded with `pad_id`, truncated at S = `seq_len`),
    loss_mask uint8 `[B, S]` (0 on padding),
    lengths int32 `[B]` (true lengths, <= S),
    sample_index int64 `[B]` (rows of the corpus, e.g. for an offline feature cache).

  The position is `state() == {"epoch", "index"}` (+ identity checks); `restore(state)` makes
  the iterator continue exactly where the saved one was.
  """

  def __init__(self, data: TokenizedData | str | os.PathLike, *, batch_size: int, seq_len: int,
               seed: int = 42, pad_id: int = 0, shuffle: bool = True, bucket_window: int = 0):
    """Args:
      data: `TokenizedData` or a path to `tokenize_file`'s `.npz`.
      batch_size: B, samples per batch (the global batch).
      seq_len: S, fixed sequence length.
      seed: shuffle seed.
      pad_id: token id of padding.
      shuffle: False visits samples in file order (tests, evaluation).
      bucket_window: sort-within-window bucketing, in batches (0/1 = off).
    """
    self.data = data if isinstance(data, TokenizedData) else load_tokenized(data)
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    self.num_samples = len(self.data)
    if self.num_samples < batch_size:
      raise ValueError(f"the corpus has {self.num_samples} samples, fewer than one batch of "
                       f"{batch_size}")
    self.batch_size, self.seq_len = int(batch_size), int(seq_len)
    self.seed, self.pad_id, self.shuffle = int(seed), int(pad_id), bool(shuffle)
    self.bucket_window = int(bucket_window)
    self.steps_per_epoch = self.num_samples // self.batch_size
    self.samples_per_epoch = self.steps_per_epoch * self.batch_size
    self._lengths = np.minimum(self.data.lengths, self.seq_len)
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order = None, None

  def epoch_order(self, epoch: int) -> np.ndarray:
    """int64 `[steps_per_epoch, B]`: the sample indices of every batch of `epoch`."""
    b = self.batch_size
    if not self.shuffle:
      return np.arange(self.samples_per_epoch, dtype=np.int64).reshape(-1, b)
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(self.num_samples)[:self.samples_per_epoch].reshape(-1, b)
    k = self.bucket_window
    if k > 1:
      for w in range(0, perm.shape[0], k):
        win = perm[w:w + k].reshape(-1)
        win = win[np.argsort(-self._lengths[win], kind="stable")].reshape(-1, b)
        perm[w:w + k] = win[rng.permutation(win.shape[0])]
    return perm.astype(np.int64)

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
            "batch_size": self.batch_size, "num_samples": self.num_samples}

  def restore(self, state: dict) -> None:
    """Continues from `state()` of an iterator over the same corpus and settings."""
    for k in ("seed", "batch_size", "num_samples"):
      if k in state and int(state[k]) != getattr(self, k):
        raise ValueError(f"cannot restore a data position saved with {k}={state[k]} into an "
                         f"iterator with {k}={getattr(self, k)}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index >= self.steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    if self._order_epoch != self.epoch:
      self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
    rows = self._order[self.index]
    self.index += 1
    return self.make_batch(rows)

  def make_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    b, s = len(rows), self.seq_len
    tokens = np.full((b, s), self.pad_id, np.int32)
    mask = np.zeros((b, s), np.uint8)
    lengths = np.zeros((b,), np.int32)
    for j, i in enumerate(rows):
      toks, m = self.data.sample(int(i))
      n = min(len(toks), s)
      tokens[j, :n] = toks[:n]
      mask[j, :n] = m[:n]
      lengths[j] = n
    return {"tokens": tokens, "loss_mask": mask, "lengths": lengths,
            "sample_index": np.asarray(rows, np.int64)}
