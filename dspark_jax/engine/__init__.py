"""The decode engine: owns the device buffers and is the one caller of the jitted loops.

`Engine(target)` holds a bounded, thread-safe pool of KV-cache and draft-state
buffers (donated to each call and handed back), and runs

  * `run(batch, ...)`: one batch from prompts to outputs in one device program (what
    `generate` uses: prefill and every round on device, one download);
  * `init(batch, ...)` / `rounds(state, n)` / `insert(state, new, slots)`: the same pure
    functions split at round boundaries, so a server can admit requests between rounds.

`Engine.for_target(target)` returns the shared engine of a target (held weakly: it goes
with the target), so repeated `generate` calls reuse buffers without the target object
storing them. Draft-state buffers are keyed by the draft's configuration, so one engine
serves any draft of its target (the draft is an argument of each call).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.decoding import loop as loop_lib
from dspark_jax.decoding import sampling
from dspark_jax.decoding import speculative
from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import Batch


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum): batch, prompt and output shape buckets."""
  return max(minimum, 1 << max(0, (max(n, 1) - 1).bit_length()))


class BufferPool:
  """At most `max_buffers` idle device buffers, evicted least-recently-used; thread-safe.

  Buffers are keyed by what makes them interchangeable (kind, geometry, batch, capacity):
  `take` hands one out (or None), `give` returns it after a call that donated it.
  """

  def __init__(self, max_buffers: int = 4):
    if max_buffers < 0:
      raise ValueError(f"max_buffers must be >= 0, got {max_buffers}")
    self.max_buffers = max_buffers
    self._idle: collections.OrderedDict[Any, list] = collections.OrderedDict()
    self._lock = threading.Lock()

  def take(self, key):
    with self._lock:
      bufs = self._idle.get(key)
      if not bufs:
        return None
      buf = bufs.pop()
      if not bufs:
        del self._idle[key]
      return buf

  def give(self, key, buf) -> None:
    with self._lock:
      self._idle.setdefault(key, []).append(buf)
      self._idle.move_to_end(key)
      while self.size > self.max_buffers:
        oldest = next(iter(self._idle))
        self._idle[oldest].pop(0)
        if not self._idle[oldest]:
          del self._idle[oldest]

  @property
  def size(self) -> int:
    return sum(len(v) for v in self._idle.values())

  def clear(self) -> None:
    with self._lock:
      self._idle.clear()


@dataclasses.dataclass
class RunResult:
  """Host copies of one batch's results (rows of the padded batch)."""

  out: np.ndarray  # int32 [B, O]
  num_out: np.ndarray  # int32 [B]
  rounds: np.ndarray  # int32 [B] decode steps (plain) or rounds (speculative)
  record: dict | None = None  # speculative: accept/verify lengths, confidences, counts


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len", "prefill_budget"),
                   donate_argnames=("cache",))
def _ar_init(graphdef, params, batch, cache, seed_key, sampling_params, *, out_len,
             prefill_budget=None):
  return loop_lib.ar_init(nnx.merge(graphdef, params), batch, cache, seed_key, sampling_params,
                          out_len=out_len, prefill_budget=prefill_budget)


def _head(tree, rows: int | None):
  """The first `rows` rows of every batch-major leaf (scalars as they are)."""
  if rows is None:
    return tree
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else x[:rows], tree)


def _put_head(full, head, rows: int | None):
  """`full` with its first rows replaced by `head`'s (scalars: `head`'s)."""
  if rows is None:
    return head
  return jax.tree.map(lambda f, h: h if jnp.ndim(f) == 0 else
                      jax.lax.dynamic_update_slice_in_dim(f, h.astype(f.dtype), 0, axis=0),
                      full, head)


@functools.partial(jax.jit, static_argnames=("graphdef", "rows"), donate_argnames=("state",))
def _ar_rounds(graphdef, params, state, seed_key, sampling_params, num_steps, stop_on_finish,
               rows=None):
  loop_lib.count_trace("ar_rounds")
  head = loop_lib.ar_rounds(nnx.merge(graphdef, params), _head(state, rows), seed_key,
                            _head(sampling_params, rows), num_steps, stop_on_finish)
  return _put_head(state, head, rows)


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "loop", "out_len", "max_rounds",
                                             "prefill_budget"),
                   donate_argnames=("cache", "draft_state"))
def _spec_init(tgraph, tparams, dgraph, dparams, batch, cache, draft_state, seed_key, params, *,
               loop, out_len, max_rounds, prefill_budget=None):
  return speculative.spec_init(nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams), loop,
                               batch, cache, draft_state, seed_key, params, out_len=out_len,
                               max_rounds=max_rounds, prefill_budget=prefill_budget)


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "loop", "rows"),
                   donate_argnames=("state",))
def _spec_rounds(tgraph, tparams, dgraph, dparams, state, seed_key, params, scheduler,
                 verify_cap, num_rounds, stop_on_finish, *, loop, rows=None):
  loop_lib.count_trace("spec_rounds")
  head = speculative.spec_rounds(nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams), loop,
                                 _head(state, rows), seed_key, _head(params, rows), scheduler,
                                 _head(verify_cap, rows), num_rounds, stop_on_finish)
  return _put_head(state, head, rows)


def _abstract(x):
  """What `jit(...).lower` needs of an argument leaf: its type, and its sharding when it is
  committed (so the lowering matches a later call with the real array)."""
  if not isinstance(x, jax.Array):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None,
                              weak_type=x.aval.weak_type)


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert(state, new, slots):
  """Rows `slots` `[n]` of `state` replaced by the n rows of `new` (batch-major leaves).

  A slot >= B drops its row: admissions pad to a bucketed row count.
  """
  def put(big, small):
    if big.ndim == 0:  # loop-wide scalars (probe counter) keep the running state's value
      return big
    return big.at[slots].set(small.astype(big.dtype), mode="drop")
  return jax.tree.map(put, state, new)


class Engine:
  """Buffers and jitted loops for one target."""

  _shared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
  _shared_lock = threading.Lock()

  def __init__(self, target, *, max_buffers: int = 4, packed_prefill: bool = True):
    self._target = weakref.ref(target)  # the shared registry is keyed weakly on the target
    self.pool = BufferPool(max_buffers)
    self.packed_prefill = packed_prefill

  @property
  def target(self):
    t = self._target()
    if t is None:
      raise RuntimeError("this engine's target has been garbage-collected")
    return t

  @classmethod
  def for_target(cls, target) -> "Engine":
    """The shared engine of `target`."""
    with cls._shared_lock:
      eng = cls._shared.get(target)
      if eng is None:
        eng = cls._shared[target] = cls(target)
      return eng

  def close(self) -> None:
    """Frees every idle buffer."""
    self.pool.clear()

  # ---- buffers ------------------------------------------------------------------------------
  def _cache(self, batch: int, capacity: int) -> tuple[Any, KVCache]:
    t = self.target
    key = ("target", t.config, jnp.dtype(t.dtype).name, batch, capacity)
    cache = self.pool.take(key)
    if cache is None:
      cache = KVCache.init(t.config, batch, capacity, t.dtype).place(t.mesh)
    return key, cache

  def _draft_state(self, d, batch: int, capacity: int):
    key = ("draft", d.config, jnp.dtype(d.dtype).name, batch, capacity)
    state = self.pool.take(key)
    if state is None:
      mesh = self.target.mesh
      state = jax.tree.map(  # caches by their own layout, other per-row state over rows
          lambda x: x.place(mesh) if isinstance(x, KVCache) else
          jax.device_put(x, sharding_lib.batch_sharding(mesh, x.shape)),
          d.runtime.init_state(d.config, batch, capacity, d.dtype),
          is_leaf=lambda x: isinstance(x, KVCache))
    return key, state

  # ---- one batch, one program -----------------------------------------------------------------
  def run(self, batch: Batch, seed_key, params: sampling.SamplingParams, *, steps: int,
          draft=None, loop: speculative.LoopSpec | None = None, scheduler=None,
          verify_cap: np.ndarray | None = None) -> RunResult:
    """Prefill + decode of one padded batch on device; `steps` >= every row's max_new."""
    b, tp = batch.tokens.shape
    t = self.target
    budget = self.prefill_budget(batch)
    if loop is None:
      ckey, cache = self._cache(b, tp + steps)
      out, num, nsteps, cache = loop_lib.ar_generate(t.graphdef, t.params, batch, cache,
                                                     seed_key, params, max_steps=steps,
                                                     prefill_budget=budget)
      self.pool.give(ckey, cache)
      out, num, nsteps = jax.device_get((out, num, nsteps))
      return RunResult(out=np.asarray(out), num_out=np.asarray(num), rounds=np.asarray(num))
    d = draft
    capacity = tp + steps + loop.num_draft + 1
    ckey, cache = self._cache(b, capacity)
    dkey, dstate = self._draft_state(d, b, capacity)
    cap = jnp.asarray(verify_cap if verify_cap is not None
                      else np.full((b,), loop.num_draft, np.int32))
    s = speculative.spec_generate(t.graphdef, t.params, d.graphdef, d.params, batch, cache,
                                  dstate, seed_key, params, cap, scheduler, loop=loop,
                                  max_steps=steps, prefill_budget=budget)
    self.pool.give(ckey, s.cache)
    self.pool.give(dkey, s.draft_state)
    return self._record(s)

  def prefill_budget(self, batch: Batch) -> int | None:
    """Packed-prefill budget of `batch` (`loop.packed_prefill_budget`; None: dense). Reads
    the prompt lengths back to the host once, before the program runs; `packed_prefill=False`
    on the engine keeps every prefill dense."""
    if not self.packed_prefill:
      return None
    return loop_lib.packed_prefill_budget(np.asarray(jax.device_get(batch.lengths)),
                                          batch.tokens.shape[1])

  @staticmethod
  def _record(s) -> RunResult:
    rec = jax.device_get(dict(out=s.out, num_out=s.num_out, steps=s.steps,
                              accept_lens=s.accept_lens, verify_lens=s.verify_lens,
                              proposed=s.proposed, confidence=s.confidence,
                              pos_hits=s.pos_hits, pos_tries=s.pos_tries))
    rec = {k: np.asarray(v) for k, v in rec.items()}
    return RunResult(out=rec["out"], num_out=rec["num_out"], rounds=rec["steps"], record=rec)

  # ---- split at round boundaries (servers) ----------------------------------------------------
  def init(self, batch: Batch, seed_key, params, *, out_len: int, draft=None,
           loop: speculative.LoopSpec | None = None, max_rounds: int | None = None,
           capacity: int):
    """Prefill + first token of `batch` into fresh buffers: a decode state."""
    b = batch.tokens.shape[0]
    t = self.target
    _, cache = self._cache(b, capacity)
    budget = self.prefill_budget(batch)
    if loop is None:
      return _ar_init(t.graphdef, t.params, batch, cache, seed_key, params, out_len=out_len,
                      prefill_budget=budget)
    d = draft
    _, dstate = self._draft_state(d, b, capacity)
    return _spec_init(t.graphdef, t.params, d.graphdef, d.params, batch, cache, dstate,
                      seed_key, params, loop=loop, out_len=out_len,
                      max_rounds=max_rounds or out_len, prefill_budget=budget)

  def rounds(self, state, num_rounds: int, seed_key, params, *, draft=None,
             loop: speculative.LoopSpec | None = None, scheduler=None, verify_cap=None,
             rows: int | None = None, stop_on_finish: bool = False):
    """Up to `num_rounds` rounds (decode steps when plain) of `state`, on device.

    `rows` (static): only the first `rows` rows run (the others keep their state), so a
    server with few live requests in its low slots does not pay for all of them; one
    program per distinct value (`rounds_compiler` builds one ahead, off the caller's
    thread). `stop_on_finish` (an argument, not compiled in): return after the round in
    which some row finishes, so its slot can be refilled at once.
    """
    fn, args, kwargs = self._rounds_call(state, num_rounds, seed_key, params, draft=draft,
                                         loop=loop, scheduler=scheduler,
                                         verify_cap=verify_cap, rows=rows,
                                         stop_on_finish=stop_on_finish)
    return fn(*args, **kwargs)

  def rounds_compiler(self, state, seed_key, params, *, draft=None,
                      loop: speculative.LoopSpec | None = None, scheduler=None,
                      verify_cap=None, rows: int | None = None):
    """A no-argument function that compiles the `rounds` program these arguments would run,
    without running it.

    The arguments' shapes, dtypes and shardings are read now (so `state` may be donated by
    a later call), the tracing and compiling happen when the function is called: a server
    calls it on a helper thread and keeps decoding with a program it already has. The later
    `rounds` call with matching arguments then reuses the compiled program (JAX's trace,
    lowering and compilation caches).
    """
    fn, args, kwargs = self._rounds_call(state, 1, seed_key, params, draft=draft, loop=loop,
                                         scheduler=scheduler, verify_cap=verify_cap,
                                         rows=rows, stop_on_finish=False)
    graphs = [self.target.graphdef] + ([draft.graphdef] if draft is not None else [])
    args = [a if any(a is g for g in graphs) else jax.tree.map(_abstract, a) for a in args]
    return lambda: fn.lower(*args, **kwargs).compile()

  def _rounds_call(self, state, num_rounds, seed_key, params, *, draft, loop, scheduler,
                   verify_cap, rows, stop_on_finish):
    """(jitted function, arguments, static keywords) of one `rounds` call."""
    t = self.target
    n = jnp.int32(num_rounds)
    stop = jnp.asarray(bool(stop_on_finish))
    if rows is not None and rows >= next(x.shape[0] for x in jax.tree.leaves(state) if x.ndim):
      rows = None
    if loop is None:
      return (_ar_rounds, (t.graphdef, t.params, state, seed_key, params, n, stop),
              dict(rows=rows))
    d = draft
    b = state.anchor.shape[0]
    cap = jnp.asarray(verify_cap if verify_cap is not None
                      else np.full((b,), loop.num_draft, np.int32))
    return (_spec_rounds, (t.graphdef, t.params, d.graphdef, d.params, state, seed_key, params,
                           scheduler, cap, n, stop), dict(loop=loop, rows=rows))

  @staticmethod
  def insert(state, new, slots):
    """`state` with rows `slots` replaced by the rows of `new` (same capacities)."""
    return _insert(state, new, jnp.asarray(slots, jnp.int32))
