"""Continuous batching: a fixed set of B slots, requests admitted between rounds.

One `ContinuousBatcher` owns one running decode state of B rows (plain or speculative).
Each `step()`:

  1. admits waiting requests into free slots: their prompts are prefilled as one small
     batch (`Engine.init`, bucketed to a power of two <= B rows) and copied into the
     running state (`Engine.insert`);
  2. runs up to `rounds_per_step` decode rounds of every live row in one device call
     (`Engine.rounds`: one `lax.while_loop`, no host round trip inside);
  3. downloads the rows' output counters and hands each request its new tokens; a row that
     ended (stop token, length, stop string, cancel) frees its slot for the next step.

A row's tokens depend on (seed, request id, step) only, never on its batch-mates or on when
it was admitted, so a request gives the tokens `generate` gives it with the same seed and
request id (tests). Requests carry their own sampling settings, stop ids/strings and
limits; per-row settings are arrays, so mixing them does not recompile.

Shapes are static: B slots, capacity C, output buffer O (the largest `max_new_tokens`
accepted), prompt buckets of powers of two.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding import sampling
from dspark_jax.decoding.state import Batch
from dspark_jax.engine import Engine, bucket
from dspark_jax.engine.spec_setup import SpecSetup


class RequestError(ValueError):
  """A request that cannot be served as given (one-line message for the client)."""


@dataclasses.dataclass
class Request:
  """One generation request.

  Attributes:
    prompt: token ids.
    max_new_tokens: limit on new tokens (None = the batcher's `max_new_tokens`, the most it
      accepts).
    temperature / top_k / top_p: sampling settings (temperature 0 = greedy).
    stop_tokens: stop ids (None = the target's eos ids); a generated stop id is kept.
    stop_strings: text that ends the request; the text is cut before it.
    request_id: RNG stream id (None = a fresh one); with the batcher's seed it fixes the
      request's randomness, so equal ids give equal outputs.
    id: the caller's label (anything).
    on_update: called from the batcher's thread with this request after new tokens or the
      end (`done`); must not block.
  """

  prompt: Sequence[int]
  max_new_tokens: int | None = None
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: Sequence[int] | None = None
  stop_strings: Sequence[str] = ()
  request_id: int | None = None
  id: Any = None
  on_update: Callable[["Request"], None] | None = None
  # Filled in by the batcher.
  tokens: list[int] = dataclasses.field(default_factory=list)
  text: str = ""  # decoded output (stop strings removed), when the target has a tokenizer
  done: bool = False
  finish_reason: str | None = None  # "stop" | "length" | "cancelled"
  rounds: int = 0
  # Speculative only, per round: tokens committed, drafts verified, whether the round
  # proposed, the raw confidence logits [P] (what `GenerationStats` reports per row).
  accept_lengths: list[int] = dataclasses.field(default_factory=list)
  verify_lengths: list[int] = dataclasses.field(default_factory=list)
  proposed: list[bool] = dataclasses.field(default_factory=list)
  confidence_logits: list = dataclasses.field(default_factory=list)
  t_submit: float = 0.0
  t_first: float | None = None
  t_done: float | None = None
  _cancel: bool = False
  _event: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

  def cancel(self) -> None:
    """Ends the request at the next step and frees its slot (e.g. the client went away)."""
    self._cancel = True

  def wait(self, timeout: float | None = None) -> bool:
    return self._event.wait(timeout)

  def stable_text(self) -> str:
    """The part of `text` no later token can change (for streaming).

    Holds back an unfinished multi-byte character and, while the request runs, a tail that
    could still become a stop string.
    """
    text = self.text
    if self.done:
      return text
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in self.stop_strings:
      for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
          hold = max(hold, n)
          break
    return text[:len(text) - hold]

  @property
  def ttft_s(self) -> float | None:
    return None if self.t_first is None else self.t_first - self.t_submit

  @property
  def latency_s(self) -> float | None:
    return None if self.t_done is None else self.t_done - self.t_submit


@dataclasses.dataclass
class Counters:
  """Totals since start (what `/metrics` exports; names follow vLLM's spec-decode ones)."""

  requests_finished: int = 0
  prompt_tokens: int = 0
  generation_tokens: int = 0
  steps: int = 0
  num_drafts: int = 0  # rounds that proposed a block
  num_draft_tokens: int = 0  # drafts verified
  num_accepted_tokens: int = 0
  position_hits: np.ndarray | None = None  # [P]
  position_tries: np.ndarray | None = None  # [P]


class ContinuousBatcher:
  """Slots + one running decode state; see the module docstring.

  Args:
    target: a loaded target.
    draft: a loaded draft (speculative) or None (plain decoding).
    slots: B, rows decoded together.
    max_new_tokens: O, the largest per-request limit accepted.
    max_prompt_len: the longest prompt accepted (default: what the model's context leaves).
    rounds_per_step: rounds per device call between admissions (latency vs host overhead).
    num_draft_tokens / scheduler / tree / acceptance: as in `generate`.
    max_stop_tokens: the most stop ids a request may carry (the stop-id array's width).
    seed: RNG seed shared by all requests (each has its own request id stream).
    background_compile: when fewer rows are live than the smallest compiled program covers,
      keep running that program and compile the smaller one on a helper thread (a compile
      takes about a minute for a 30-layer model on a CPU); False: compile it at once.
  """

  def __init__(self, target, draft=None, *, slots: int = 8, max_new_tokens: int = 256,
               max_prompt_len: int | None = None, rounds_per_step: int = 4,
               num_draft_tokens: int | None = None, scheduler="fixed", seed: int = 0,
               tree=None, background_compile: bool = True, acceptance: str = "exact",
               max_stop_tokens: int = 4):
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if rounds_per_step < 1:
      raise ValueError(f"rounds_per_step must be >= 1, got {rounds_per_step}")
    self.target, self.draft = target, draft
    self.slots = slots
    self.spec = None
    if draft is not None:
      self.spec = SpecSetup.make(target, draft, num_draft_tokens, None, slots, acceptance,
                                 scheduler=scheduler, batch_size=bucket(slots, 1), tree=tree)
    extra = self.spec.extra_capacity if self.spec else 0
    limit = target.config.max_position_embeddings
    self.max_new_tokens = max_new_tokens
    self.out_len = bucket(max_new_tokens)
    if max_prompt_len is None:
      max_prompt_len = limit - max_new_tokens - extra
    elif max_prompt_len + max_new_tokens + extra > limit:
      raise ValueError(f"max_prompt_len={max_prompt_len} + max_new_tokens={max_new_tokens} "
                       f"exceeds the model's {limit} positions")
    if max_prompt_len < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                       f"model's {limit} positions")
    self.max_prompt_len = max_prompt_len
    self.capacity = bucket(max_prompt_len) + self.out_len + extra
    self.rounds_per_step = rounds_per_step
    self.seed_key = jax.random.key(seed)
    self.engine = Engine.for_target(target)
    self.counters = Counters()
    self._ids = itertools.count(1 << 24)  # fresh RNG streams, away from small explicit ids
    self._queue: collections.deque[Request] = collections.deque()
    self._lock = threading.Lock()
    self._rows: list[Request | None] = [None] * slots
    self._seen = np.zeros((slots,), np.int64)  # tokens already handed to each row's request
    # Per-row sampling settings of the running state (free slots: greedy, so an all-greedy
    # workload keeps the static greedy program).
    self._temp = np.zeros((slots,), np.float32)
    self._top_k = np.zeros((slots,), np.int32)
    self._top_p = np.ones((slots,), np.float32)
    self._stops = max(max_stop_tokens, len(target.stop_token_ids))
    self.state = None
    self.background_compile = background_compile
    # Decode-round programs by (rows, sampling-parameter structure): compiled, or being
    # compiled on the helper thread (key -> threading.Event set when it is done or failed).
    self._ready: set = set()
    self._compiling: dict[Any, threading.Event] = {}
    self._compile_jobs: collections.deque = collections.deque()
    self._compile_lock = threading.Lock()
    self._compile_thread: threading.Thread | None = None

  # ---- requests ---------------------------------------------------------------------------
  def check(self, req: Request) -> None:
    """Raises RequestError (one line) if `req` cannot be served."""
    if not len(req.prompt):
      raise RequestError("the prompt is empty")
    if len(req.prompt) > self.max_prompt_len:
      raise RequestError(f"the prompt has {len(req.prompt)} tokens; this server accepts at "
                         f"most {self.max_prompt_len}")
    if req.max_new_tokens is None:
      req.max_new_tokens = self.max_new_tokens
    if not 1 <= req.max_new_tokens <= self.max_new_tokens:
      raise RequestError(f"max_tokens must be in [1, {self.max_new_tokens}], got "
                         f"{req.max_new_tokens}")
    try:
      sampling.SamplingParams.make(req.temperature, req.top_k, req.top_p)
      self.target.check_token_ids(list(req.prompt))
    except ValueError as e:
      raise RequestError(str(e)) from None
    stops = self.target.stop_token_ids if req.stop_tokens is None else req.stop_tokens
    if len(stops) > self._stops:
      raise RequestError(f"at most {self._stops} stop token ids per request")

  def submit(self, req: Request) -> Request:
    """Queues `req` (validated) for the next free slot; returns it."""
    self.check(req)
    if req.request_id is None:
      req.request_id = next(self._ids)
    req.t_submit = time.perf_counter()
    with self._lock:
      self._queue.append(req)
    return req

  @property
  def num_waiting(self) -> int:
    return len(self._queue)

  @property
  def num_running(self) -> int:
    return sum(r is not None for r in self._rows)

  @property
  def idle(self) -> bool:
    return not self._queue and self.num_running == 0

  # ---- the step ---------------------------------------------------------------------------
  def _params(self, temp, top_k, top_p) -> sampling.SamplingParams:
    return sampling.SamplingParams.for_rows(temp, top_k, top_p)

  def _loop_kw(self) -> dict:
    if self.spec is None:
      return {}
    return dict(draft=self.draft, loop=self.spec.loop)

  def _rounds_kw(self) -> dict:
    kw = self._loop_kw()
    if self.spec is not None:
      kw["scheduler"] = self.spec.scheduler
    return kw

  def _batch(self, reqs: Sequence[Request], rows: int) -> Batch:
    tp = bucket(max([1] + [len(r.prompt) for r in reqs]))
    tokens = np.zeros((rows, tp), np.int32)
    lengths = np.ones((rows,), np.int32)
    max_new = np.ones((rows,), np.int32)  # padding rows end at their first token
    stops = np.full((rows, self._stops), -1, np.int32)
    rid = np.zeros((rows,), np.int32)
    for j, r in enumerate(reqs):
      tokens[j, :len(r.prompt)] = r.prompt
      lengths[j] = len(r.prompt)
      max_new[j] = r.max_new_tokens
      s = list(self.target.stop_token_ids if r.stop_tokens is None else r.stop_tokens)
      stops[j, :len(s)] = s
      rid[j] = r.request_id
    return Batch(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(max_new),
                 jnp.asarray(stops), jnp.asarray(rid))

  def _init(self, reqs: Sequence[Request], rows: int):
    temp = np.zeros((rows,), np.float32)
    top_k = np.zeros((rows,), np.int32)
    top_p = np.ones((rows,), np.float32)
    for j, r in enumerate(reqs):
      temp[j], top_k[j], top_p[j] = r.temperature, r.top_k, r.top_p
    kw = self._loop_kw()
    if self.spec is not None:
      kw["max_rounds"] = self.out_len
    return self.engine.init(self._batch(reqs, rows), self.seed_key,
                            self._params(temp, top_k, top_p), out_len=self.out_len,
                            capacity=self.capacity, **kw), (temp, top_k, top_p)

  def _admit(self) -> None:
    if self.state is None:  # every slot starts as a finished padding row
      self.state, _ = self._init([], self.slots)
    free = [i for i, r in enumerate(self._rows) if r is None]
    with self._lock:
      take = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
    take = [r for r in take if not self._finish_cancelled(r)]
    if not take:
      return
    rows = min(bucket(len(take), minimum=1), self.slots)
    new, (temp, top_k, top_p) = self._init(take, rows)
    slots = np.full((rows,), self.slots, np.int32)  # padding rows -> out of range: dropped
    for j, r in enumerate(take):
      slot = free[j]
      slots[j] = slot
      self._rows[slot] = r
      self._seen[slot] = 0
      self._temp[slot], self._top_k[slot], self._top_p[slot] = temp[j], top_k[j], top_p[j]
      self.counters.prompt_tokens += len(r.prompt)
    self.state = self.engine.insert(self.state, new, slots)

  def _finish_cancelled(self, r: Request) -> bool:
    if r._cancel:
      self._finish(r, "cancelled")
      return True
    return False

  def step(self, max_rounds: int | None = None, stop_on_finish: bool | None = None,
           compile_ahead: bool = True) -> list[Request]:
    """Admits, runs up to `max_rounds` rounds (default `rounds_per_step`), hands out tokens.

    The device call also returns as soon as a row finishes when `stop_on_finish` (default:
    whenever requests are waiting for a slot), so a freed slot is refilled after one round,
    not after the rest of the step. Offline work uses `offline_step`. `compile_ahead`:
    whether a live-row program not compiled yet may be queued for the helper thread.

    Returns the requests that got new tokens or ended in this step.
    """
    self._admit()
    if self.num_running == 0:
      return []
    params = self._params(self._temp, self._top_k, self._top_p)
    kw = self._rounds_kw()
    # Only the slots up to the highest live one (bucketed) run: admissions fill the lowest
    # free slots, so at low load the live rows sit at the bottom.
    live = max(i for i, r in enumerate(self._rows) if r is not None)
    if stop_on_finish is None:
      stop_on_finish = self.num_waiting > 0
    rounds = max_rounds or self.rounds_per_step
    if any(r is not None and r.stop_strings for r in self._rows):
      # Stop strings are matched on the host: a long call would decode past them.
      rounds = min(rounds, self.rounds_per_step)
    rows = self._program_rows(min(bucket(live + 1, minimum=1), self.slots), params, kw,
                              compile_ahead)
    self.state = self.engine.rounds(self.state, rounds, self.seed_key, params, rows=rows,
                                    stop_on_finish=stop_on_finish, **kw)
    self._ready.add((rows, jax.tree.structure(params)))
    self.counters.steps += 1
    return self._harvest()

  # ---- programs ---------------------------------------------------------------------------
  def _program_rows(self, want: int, params, kw, compile_ahead: bool = True) -> int:
    """The live-row bucket to run: `want`, or while its program is not compiled yet the
    smallest bigger one that is (same tokens: rows past the live ones are finished and
    change nothing), with `want` queued for the helper thread."""
    structure = jax.tree.structure(params)
    key = (want, structure)
    if not self.background_compile or key in self._ready:
      return want
    bigger = [r for r, s in list(self._ready) if s == structure and r > want]
    if not bigger:
      if key in self._compiling:  # being compiled already: wait for it, do not compile twice
        self._compiling[key].wait()
      return want  # else nothing to fall back on: compile it now
    if compile_ahead:
      self._compile_later(want, params, kw)
    return min(bigger)

  def _compile_later(self, rows: int, params, kw) -> None:
    key = (rows, jax.tree.structure(params))
    if key in self._compiling or key in self._ready:
      return
    self._compiling[key] = threading.Event()
    compile_fn = self.engine.rounds_compiler(self.state, self.seed_key, params, rows=rows, **kw)
    self._queue_compile(key, compile_fn)

  def precompile(self, rows: Sequence[int] | None = None) -> None:
    """Queues the greedy decode-round programs of these live-row counts (default every
    bucket: 1 first, then all B slots, then the rest) for the helper thread, so a server or
    chat session compiles while it waits for its first request instead of after it."""
    if self.state is None:
      self.state, _ = self._init([], self.slots)
    kw = self._rounds_kw()
    params = self._params(self._temp, self._top_k, self._top_p)
    if rows is None:
      rows = [1, self.slots] + [min(bucket(n, minimum=1), self.slots)
                                for n in range(1, self.slots + 1)]
    for n in rows:
      self._compile_later(min(bucket(n, minimum=1), self.slots), params, kw)

  def _queue_compile(self, key, compile_fn) -> None:
    with self._compile_lock:
      self._compile_jobs.append((key, compile_fn))
      if self._compile_thread is None:
        # Not a daemon: a thread killed inside an XLA compile at exit aborts the process, so
        # exit waits for the compile under way (the queued ones are dropped, see below).
        self._compile_thread = threading.Thread(target=self._compile_loop,
                                                name="dspark-compile")
        self._compile_thread.start()

  def _compile_loop(self) -> None:
    """Compiles the queued programs, then ends (a new one starts with the next job)."""
    while True:
      with self._compile_lock:
        if not self._compile_jobs or not threading.main_thread().is_alive():
          for key, _ in self._compile_jobs:  # the program is exiting: drop the rest
            self._compiling[key].set()
          self._compile_jobs.clear()
          self._compile_thread = None
          return
        key, compile_fn = self._compile_jobs.popleft()
      try:
        compile_fn()
        self._ready.add(key)
      except Exception as e:  # noqa: BLE001 - the step compiles it itself when needed
        print(f"background compile of the {key[0]}-row program failed: {e}", file=sys.stderr)
      finally:
        self._compiling[key].set()

  def wait_for_compiles(self, timeout: float | None = None) -> bool:
    """Waits until every queued background compile has ended; False on timeout."""
    deadline = None if timeout is None else time.perf_counter() + timeout
    for event in list(self._compiling.values()):
      left = None if deadline is None else max(0.0, deadline - time.perf_counter())
      if not event.wait(left):
        return False
    return True

  def offline_step(self) -> list[Request]:
    """A step for offline work (nobody streams): runs until some row finishes, one host
    round trip per finished request; a step that admits requests runs one round only, so
    their first tokens (time to first token) are handed out at once."""
    admits = self.num_waiting > 0 and self.num_running < self.slots
    # With nothing waiting only the running rows' tail is left: a smaller program compiled
    # now would mostly be ready after it (short jobs would only wait for it at exit).
    return self.step(max_rounds=1 if admits else self.out_len, stop_on_finish=True,
                     compile_ahead=self.num_waiting > 0)

  def _harvest(self) -> list[Request]:
    s = self.state
    out, num, done, steps = jax.device_get((s.out, s.num_out, s.done, s.steps))
    now = time.perf_counter()
    touched, retire = [], np.zeros((self.slots,), bool)
    tok = self.target.tokenizer
    for slot, r in enumerate(self._rows):
      if r is None:
        continue
      n = int(num[slot])
      new = [int(t) for t in out[slot, self._seen[slot]:n]]
      self._seen[slot] = n
      if new and r.t_first is None:
        r.t_first = now
      r.tokens.extend(new)
      r.rounds = int(steps[slot])
      reason = None
      if tok is not None and new:
        r.text = tok.decode(r.tokens)
        cut = _first_stop_string(r.text, r.stop_strings)
        if cut is not None:
          r.text = r.text[:cut]
          reason = "stop"
      if reason is None and bool(done[slot]):
        stops = self.target.stop_token_ids if r.stop_tokens is None else r.stop_tokens
        reason = "stop" if r.tokens and r.tokens[-1] in stops else "length"
      if reason is None and r._cancel:
        reason = "cancelled"
      if reason is not None:
        if self.spec is not None:
          self._record_speculative(slot, r)
        retire[slot] = not bool(done[slot])
        self._rows[slot] = None
        self.counters.generation_tokens += len(r.tokens)
        self._finish(r, reason)
      elif new and r.on_update is not None:
        r.on_update(r)
      if new or reason is not None:
        touched.append(r)
    if retire.any():  # stop strings / cancels end rows the device still thinks are live
      self.state = _retire(self.state, jnp.asarray(retire))
    return touched

  def _record_speculative(self, slot: int, r: Request) -> None:
    s = self.state
    acc, ver, prop, conf, hits, tries = jax.device_get((
        s.accept_lens[slot], s.verify_lens[slot], s.proposed[slot], s.confidence[slot],
        s.pos_hits[slot], s.pos_tries[slot]))
    nr = r.rounds
    r.accept_lengths = [int(a) for a in acc[:nr]]
    r.verify_lengths = [int(v) for v in ver[:nr]]
    r.proposed = [bool(x) for x in prop[:nr]]
    r.confidence_logits = np.asarray(conf[:nr]).tolist()
    c = self.counters
    c.num_drafts += int(np.sum(prop[:nr]))
    c.num_draft_tokens += int(np.sum(ver[:nr]))
    c.num_accepted_tokens += int(np.sum(np.maximum(acc[:nr] - 1, 0)))
    c.position_hits = hits if c.position_hits is None else c.position_hits + hits
    c.position_tries = tries if c.position_tries is None else c.position_tries + tries

  def _finish(self, r: Request, reason: str) -> None:
    r.done, r.finish_reason, r.t_done = True, reason, time.perf_counter()
    if reason != "cancelled":
      self.counters.requests_finished += 1
    if r.on_update is not None:
      r.on_update(r)
    r._event.set()

  def fail_all(self, reason: str = "error") -> None:
    """Ends every waiting and running request with `reason` and drops the device state
    (after a failed step its buffers may have been donated)."""
    with self._lock:
      waiting, self._queue = list(self._queue), collections.deque()
    running = [r for r in self._rows if r is not None]
    self._rows = [None] * self.slots
    self.state = None
    for r in running + waiting:
      self._finish(r, reason)

  # ---- convenience ------------------------------------------------------------------------
  def run(self, reqs: Sequence[Request], progress: Callable[[list[Request]], None] | None = None
          ) -> list[Request]:
    """Submits `reqs` and steps (`offline_step`) until all have ended."""
    for r in reqs:
      self.submit(r)
    while not all(r.done for r in reqs):
      touched = self.offline_step()
      if progress is not None:
        progress(touched)
    return list(reqs)


def _first_stop_string(text: str, stops: Sequence[str]) -> int | None:
  hits = [text.find(s) for s in stops if s]
  hits = [h for h in hits if h >= 0]
  return min(hits) if hits else None


@functools.partial(jax.jit, donate_argnames=("state",))
def _retire(state, mask):
  """Marks rows `mask` `[B]` done (their slots are free; they write and record nothing)."""
  return dataclasses.replace(state, done=state.done | mask)
