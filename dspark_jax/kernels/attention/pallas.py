"""Segment attention as one flash-attention style Pallas kernel (spec: `reference.py`).

Grid (B, K, row tiles). The G query heads that share kv head k are folded with the T queries
into M = T * G rows (row m is query m // G, head m % G, as in the reference), so each key
tile is read once per kv head and feeds one `[block_q, H] x [H, block_k]` dot. A program owns
`block_q` rows and walks the key tiles of every segment in turn with one online softmax
(running max, sum and f32 accumulator): merging the segments' partial softmaxes by their
log-sum-exp, as the reference does, is the same sum.

Hidden keys follow the reference exactly: a key that a rule hides (lengths, causal,
window, mask, an invalid `Block` group) gets the finite `MASK_VALUE` logit, so a fully
masked query still softmaxes to the reference's uniform row over every key of its
segments; a key that does not exist for the row (tile padding, a lane of an overlapping
tail tile seen before, another group's key of a `Block` segment) gets -inf and weighs 0.

Tiles never run past a key axis: the last one starts at S - block_k and overlaps its
predecessor (the lanes seen before are the -inf ones), so caches are read in place without
padding copies or masked loads. A key axis shorter than 16 (a verify block's own keys) and a
head dim that is not a power of two >= 16 are zero-padded by the wrapper (Triton's dot needs
power-of-two operands of at least 16 per side); query rows are padded to a multiple of
`block_q` and sliced off.

`Block` segments loop only over the key tiles of the groups that the program's rows belong
to (dynamic loop bounds): the other groups are not part of the segment at all.

Per-query inputs (query positions, `[B, T]` lengths, a `mask`) are expanded to per-row
arrays by the wrapper, so the kernel only does plain tile loads (a mask costs G int32
copies of itself: meant for a tree's own keys, not a long cache). One program walks a
whole cache: a single long row with few kv heads leaves most of a GPU idle (no split of S
across programs yet).

`ragged_attention` is the packed-verify entry: queries flat `[N, Nh, H]` in `Pack.build`'s
layout (each row's tokens contiguous, in column order, rows in order), a row's span read at
its offset; the row's own keys/values, flat too, are a second segment read the same way.
Each program computes a dense `[block_q, Hv]` row block that is gathered back to flat
order outside (reads of neighbouring spans overlap harmlessly; writes never do).

GPU: Triton lowering; `block_q`, `block_k` must be powers of two >= 16. CPU: interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dspark_jax.kernels.attention.reference import MASK_VALUE, KV, Block

Array = jax.Array

MIN_TILE = 16  # Triton's dot: every operand side at least 16
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_GPU_HEAD_DIM = 256  # a [block_q, H] f32 accumulator beyond this spills Triton's registers


def _pow2_ceil(x: int, lo: int = MIN_TILE) -> int:
  return max(lo, pl.next_power_of_2(max(x, 1)))


def _pow2_floor(x: int) -> int:
  return 1 << (max(x, 1).bit_length() - 1)


def _pad(x: Array, axis: int, size: int) -> Array:
  """Zero-pads `axis` of `x` up to `size` (no copy when it already has that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _rows(x: Array, g: int, mp: int) -> Array:
  """Per-query `[..., T, ...]` (axis 1) -> per-row (`[..., T * G, ...]` padded to `mp`)."""
  return _pad(jnp.repeat(x, g, axis=1), 1, mp)


@dataclasses.dataclass(frozen=True)
class _Seg:
  """A segment as the kernel sees it (static).

  Attributes:
    kind: "kv" or "block".
    keys: length of the key axis of its arrays (>= `tile`).
    real: keys that exist (the rest is padding).
    tile: keys per step (a power of two).
    arrays: names of its kernel inputs, in order ("k", "v", then optional ones).
    flat: keys read at the row's offset in a flat token axis (ragged own keys).
  """

  kind: str
  keys: int
  real: int
  tile: int
  arrays: tuple[str, ...]
  causal: bool = False
  window: int | None = None
  group: int = 1
  flat: bool = False


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one kernel call: `rows` = M real rows per (b, k)."""

  segs: tuple[_Seg, ...]
  g: int
  rows: int
  block_q: int
  scale: float
  softcap: float | None
  qpos: bool
  ragged: bool


def _segment(seg: _Seg, r: dict, q: Array, qpos, t: Array, i, off, cnt, carry, plan: _Plan):
  """Folds one segment's key tiles into the running (max, sum, accumulator) of the rows."""
  ts, n, tm = seg.tile, seg.keys, plan.block_q
  base = off if seg.flat else 0
  lens = r["lengths"][...] if "lengths" in r else None  # [tm]
  if seg.kind == "block":
    grp = lax.div(t, seg.group)  # [tm] each row's group
    # Only the tiles holding the keys of this program's groups (its real rows).
    first = lax.div(lax.div(i * tm, plan.g), seg.group) * seg.group
    last_row = jnp.minimum(i * tm + tm, plan.rows) - 1
    end = jnp.minimum((lax.div(lax.div(last_row, plan.g), seg.group) + 1) * seg.group, seg.real)
    lo, hi = lax.div(first, ts), lax.div(end + ts - 1, ts)
  else:
    lo, hi = 0, pl.cdiv(n, ts)

  def body(j, carry):
    m, l, acc = carry
    start = jnp.minimum(j * ts, n - ts)  # the tail tile overlaps its predecessor
    slot = start + lax.iota(jnp.int32, ts)
    kt = r["k"][:, pl.ds(base + start, ts)]  # [Hp, ts]
    vt = r["v"][pl.ds(base + start, ts), :]  # [ts, Hvp]
    if seg.flat:
      # Lanes past the row's own tokens hold the next row's: zero them, as the dense
      # layout's empty slots are (they still count, masked, in a fully masked row).
      own = slot < cnt
      kt = jnp.where(own[None, :], kt, jnp.zeros((), kt.dtype))
      vt = jnp.where(own[:, None], vt, jnp.zeros((), vt.dtype))
    ct = jnp.promote_types(q.dtype, kt.dtype)
    s = jnp.dot(q.astype(ct), kt.astype(ct), preferred_element_type=jnp.float32) * plan.scale
    if plan.softcap is not None:
      s = jnp.tanh(s / plan.softcap) * plan.softcap
    gone = ((slot < j * ts) | (slot >= seg.real))[None, :]  # [1, ts]
    vis = None
    if seg.kind == "block":
      gone = gone | (lax.div(slot, seg.group)[None, :] != grp[:, None])
      if "valid" in r:
        vis = (r["valid"][pl.ds(start, ts)] != 0)[None, :]
    else:
      if lens is not None:
        vis = slot[None, :] < lens[:, None]
      if seg.causal:
        kpos = r["positions"][pl.ds(start, ts)] if "positions" in r else slot
        rule = kpos[None, :] <= qpos[:, None]
        if seg.window is not None:
          rule = rule & ((qpos[:, None] - kpos[None, :]) < seg.window)
        vis = rule if vis is None else vis & rule
      if "mask" in r:
        rule = r["mask"][:, pl.ds(start, ts)] != 0
        vis = rule if vis is None else vis & rule
    if vis is not None:
      s = jnp.where(vis, s, MASK_VALUE)
    s = jnp.where(gone, -jnp.inf, s)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(vt.dtype), vt,
                                         preferred_element_type=jnp.float32)
    return m_new, l, acc

  return lax.fori_loop(lo, hi, body, carry)


def _kernel(*refs, plan: _Plan):
  o_ref = refs[-1]
  it = iter(refs[:-1])
  q_ref = next(it)
  qpos_ref = next(it) if plan.qpos else None
  off_ref, cnt_ref = (next(it), next(it)) if plan.ragged else (None, None)
  seg_refs = [{name: next(it) for name in seg.arrays} for seg in plan.segs]
  tm = plan.block_q
  i = pl.program_id(2)
  t = lax.div(i * tm + lax.iota(jnp.int32, tm), plan.g)  # [tm] each row's query index
  off = cnt = None
  if plan.ragged:
    off, cnt = off_ref[0], cnt_ref[0]
    q = q_ref[pl.ds(off * plan.g + i * tm, tm), :]
    q = jnp.where((t < cnt)[:, None], q, jnp.zeros((), q.dtype))  # the dense empty slots
  else:
    q = q_ref[...]
  qpos = qpos_ref[...] if plan.qpos else None
  # A finite floor, not -inf: a tile whose lanes are all -inf must leave exp(m - m_new) = 1.
  carry = (jnp.full((tm,), jnp.finfo(jnp.float32).min, jnp.float32),
           jnp.zeros((tm,), jnp.float32), jnp.zeros((tm, o_ref.shape[-1]), jnp.float32))
  for seg, r in zip(plan.segs, seg_refs):
    carry = _segment(seg, r, q, qpos, t, i, off, cnt, carry, plan)
  _, l, acc = carry
  l = jnp.where(l > 0, l, 1.0)  # padding rows only (every real row sees a key)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _kv_inputs(seg: dict, meta: tuple, *, b, t, g, tm, mp, hp, hvp, block_k):
  """A `KV` segment's kernel inputs: (static `_Seg`, [(array, BlockSpec)])."""
  _, causal, window = meta
  k, v = seg["k"], seg["v"]
  s = v.shape[2]
  sp = max(s, MIN_TILE)
  k = _pad(_pad(k, 2, hp), 3, sp)
  v = _pad(_pad(v, 3, hvp), 2, sp)
  ins = [(k, pl.BlockSpec((None, None, hp, sp), lambda b_, k_, i: (b_, k_, 0, 0))),
         (v, pl.BlockSpec((None, None, sp, hvp), lambda b_, k_, i: (b_, k_, 0, 0)))]
  names = ["k", "v"]
  if causal and seg.get("positions") is not None:
    pos = _pad(jnp.broadcast_to(seg["positions"], (b, s)).astype(jnp.int32), 1, sp)
    ins.append((pos, pl.BlockSpec((None, sp), lambda b_, k_, i: (b_, 0))))
    names.append("positions")
  if seg.get("lengths") is not None:
    lim = seg["lengths"].astype(jnp.int32)
    lim = jnp.broadcast_to(lim if lim.ndim == 2 else lim[:, None], (b, t))
    ins.append((_rows(lim, g, mp), pl.BlockSpec((None, tm), lambda b_, k_, i: (b_, i))))
    names.append("lengths")
  if seg.get("mask") is not None:
    mask = seg["mask"].astype(jnp.int32)
    shared = mask.ndim == 2
    mask = _pad(_rows(mask[None] if shared else mask, g, mp), 2, sp)
    ins.append((mask, pl.BlockSpec(
        (None, tm, sp), (lambda b_, k_, i: (0, i, 0)) if shared else
        (lambda b_, k_, i: (b_, i, 0)))))
    names.append("mask")
  tile = min(block_k, _pow2_floor(sp))
  return _Seg("kv", sp, s, tile, tuple(names), causal=causal, window=window), ins


def _block_inputs(seg: dict, meta: tuple, *, b, t, hp, hvp, block_k):
  _, group = meta
  tp = max(t, MIN_TILE)
  k = _pad(_pad(seg["k"].transpose(0, 2, 3, 1), 2, hp), 3, tp)  # [B, K, Hp, T]
  v = _pad(_pad(seg["v"].transpose(0, 2, 1, 3), 3, hvp), 2, tp)  # [B, K, T, Hvp]
  ins = [(k, pl.BlockSpec((None, None, hp, tp), lambda b_, k_, i: (b_, k_, 0, 0))),
         (v, pl.BlockSpec((None, None, tp, hvp), lambda b_, k_, i: (b_, k_, 0, 0)))]
  names = ["k", "v"]
  if seg.get("valid") is not None:
    valid = _pad(jnp.repeat(seg["valid"].astype(jnp.int32), group, axis=1), 1, tp)
    ins.append((valid, pl.BlockSpec((None, tp), lambda b_, k_, i: (b_, 0))))
    names.append("valid")
  tile = min(block_k, _pow2_floor(tp))
  return _Seg("block", tp, t, tile, tuple(names), group=group), ins


def _split(segments) -> tuple[tuple, tuple]:
  """Segments -> (static metadata, array pytrees) so that they can cross `jax.jit`."""
  metas, arrays = [], []
  for seg in segments:
    if isinstance(seg, KV):
      metas.append(("kv", bool(seg.causal), seg.window))
      arrays.append(dict(k=seg.k, v=seg.v, positions=seg.positions, lengths=seg.lengths,
                         mask=seg.mask))
    elif isinstance(seg, Block):
      metas.append(("block", int(seg.group)))
      arrays.append(dict(k=seg.k, v=seg.v, valid=seg.valid))
    else:
      raise TypeError(f"unknown attention segment {type(seg).__name__}")
  return tuple(metas), tuple(arrays)


def unsupported(q: Array, segments, platform: str, own: tuple = ()) -> str | None:
  """Why the kernel cannot take these arguments on `platform` (None: it can); `own`: the
  ragged entry's own (k, v)."""
  segments = [seg for seg in segments if isinstance(seg, (KV, Block))]  # others: a TypeError
  for x in [q, *own] + [a for seg in segments for a in (seg.k, seg.v)]:
    if x.dtype not in DTYPES:
      return f"dtype {x.dtype} (the kernel takes float32, bfloat16, float16)"
  if platform == "gpu":
    dims = {q.shape[-1], *(x.shape[-1] for x in own)} | {seg.v.shape[-1] for seg in segments}
    if max(dims) > MAX_GPU_HEAD_DIM:
      return f"head dim {max(dims)} > {MAX_GPU_HEAD_DIM} (no head-dim split in the kernel)"
  return None


def _compiler_params(interpret: bool, hp: int):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton  # GPU only
  return pl_triton.CompilerParams(num_warps=4 if hp <= 64 else 8, num_stages=2)


def _check(q: Array, segments, q_positions) -> None:
  if not segments:
    raise ValueError("attention needs at least one key segment")
  kh = {seg.k.shape[1] if isinstance(seg, KV) else seg.k.shape[2] for seg in segments}
  if len(kh) != 1 or q.shape[2] % next(iter(kh)):
    raise ValueError(f"segments disagree on the kv heads or do not divide {q.shape[2]} query "
                     f"heads: {sorted(kh)}")
  for seg in segments:
    if isinstance(seg, KV) and seg.causal and q_positions is None:
      raise ValueError("a causal KV segment needs q_positions")
    if isinstance(seg, Block) and (seg.k.shape[1] != q.shape[1] or q.shape[1] % seg.group):
      raise ValueError(f"a Block segment needs keys aligned with the {q.shape[1]} queries in "
                       f"whole groups of {seg.group}, got {seg.k.shape[1]} keys")


def attention(q: Array, *segments, q_positions: Array | None = None, scale: float,
              softcap: float | None = None, block_q: int = 64, block_k: int = 64,
              interpret: bool = False) -> Array:
  """See `reference.attention` (same arguments and result).

  Args:
    block_q: query rows (of M = T * G) per program, clipped to M; a power of two >= 16.
    block_k: keys per step, clipped to each segment; a power of two >= 16.
    interpret: run the kernel body with XLA ops (CPU) instead of compiling it.
  """
  _check(q, segments, q_positions)
  metas, arrays = _split(segments)
  return _attention(q, q_positions, arrays, metas=metas, scale=float(scale),
                    softcap=None if softcap is None else float(softcap), block_q=block_q,
                    block_k=block_k, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("metas", "scale", "softcap", "block_q", "block_k",
                                             "interpret"))
def _attention(q, q_positions, arrays, *, metas, scale, softcap, block_q, block_k, interpret):
  b, t, n, h = q.shape
  kh = arrays[0]["k"].shape[1] if metas[0][0] == "kv" else arrays[0]["k"].shape[2]
  g = n // kh
  hv = arrays[0]["v"].shape[-1]
  hp, hvp = _pow2_ceil(h), _pow2_ceil(hv)
  m = t * g
  tm = min(block_q, _pow2_ceil(m))
  mp = pl.cdiv(m, tm) * tm
  # [B, T, N, H] -> [B, K, T * G, H]: row m is query m // G, head m % G of kv head k.
  qr = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, m, h)
  ins = [(_pad(_pad(qr, 2, mp), 3, hp),
          pl.BlockSpec((None, None, tm, hp), lambda b_, k_, i: (b_, k_, i, 0)))]
  need_pos = any(meta[0] == "kv" and meta[1] for meta in metas)
  if need_pos:
    qpos = _rows(jnp.broadcast_to(q_positions, (b, t)).astype(jnp.int32), g, mp)
    ins.append((qpos, pl.BlockSpec((None, tm), lambda b_, k_, i: (b_, i))))
  segs = []
  for meta, seg in zip(metas, arrays):
    if meta[0] == "kv":
      spec, more = _kv_inputs(seg, meta, b=b, t=t, g=g, tm=tm, mp=mp, hp=hp, hvp=hvp,
                              block_k=block_k)
    else:
      spec, more = _block_inputs(seg, meta, b=b, t=t, hp=hp, hvp=hvp, block_k=block_k)
    segs.append(spec)
    ins += more
  plan = _Plan(tuple(segs), g, m, tm, scale, softcap, need_pos, ragged=False)
  out = _launch(plan, ins, (b, kh, mp, hvp), q.dtype, hp, interpret, "segment_attention")
  out = out[:, :, :m, :hv].reshape(b, kh, t, g, hv).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, n, hv)


def _launch(plan, ins, out_shape, dtype, hp: int, interpret: bool, name: str):
  """The kernel over the grid (rows, kv heads, query tiles) of `out_shape` `[B, K, Mp, Hvp]`;
  `ins`: (array, BlockSpec) pairs in the kernel's argument order."""
  b, kh, mp, hvp = out_shape
  tm = plan.block_q
  return pl.pallas_call(
      functools.partial(_kernel, plan=plan), grid=(b, kh, mp // tm),
      in_specs=[spec for _, spec in ins],
      out_specs=pl.BlockSpec((None, None, tm, hvp), lambda b_, k_, i: (b_, k_, i, 0)),
      out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
      compiler_params=_compiler_params(interpret, hp), interpret=interpret,
      name=name)(*[x for x, _ in ins])


def ragged_attention(q: Array, cache: KV, k: Array | None = None, v: Array | None = None, *,
                     rows: Array, cols: Array, start: Array, width: int, scale: float,
                     softcap: float | None = None, mask: Array | None = None,
                     block_q: int = 64, block_k: int = 64, interpret: bool = False) -> Array:
  """See `reference.ragged_attention` (same arguments and result).

  The flat tokens must be in `Pack.build`'s layout: each row's tokens contiguous and in
  column order (columns 0, 1, ...), rows in increasing order, padding (`rows == B`) last.
  `block_q`, `block_k`, `interpret`: as in `attention`.
  """
  if (k is None) != (v is None):
    raise ValueError("the rows' own keys need both k and v")
  if q.shape[1] % cache.k.shape[1]:
    raise ValueError(f"{cache.k.shape[1]} kv heads do not divide {q.shape[1]} query heads")
  metas, arrays = _split([cache])
  own = None if k is None else dict(k=k, v=v, mask=mask)
  return _ragged(q, rows, cols, start, arrays[0], own, meta=metas[0], width=int(width),
                 scale=float(scale), softcap=None if softcap is None else float(softcap),
                 block_q=block_q, block_k=block_k, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("meta", "width", "scale", "softcap", "block_q",
                                             "block_k", "interpret"))
def _ragged(q, rows, cols, start, cache, own, *, meta, width, scale, softcap, block_q, block_k,
            interpret):
  ntok, n, h = q.shape
  b = start.shape[0]
  kh = cache["k"].shape[1]
  g = n // kh
  hv = cache["v"].shape[-1]
  hp, hvp = _pow2_ceil(h), _pow2_ceil(hv)
  w = width
  m = w * g
  tm = min(block_q, _pow2_ceil(m))
  mp = pl.cdiv(m, tm) * tm
  rows = rows.astype(jnp.int32)
  counts = jnp.zeros((b,), jnp.int32).at[rows].add(1, mode="drop")
  offsets = jnp.cumsum(counts) - counts  # Pack.build's row-major order
  # [N, Nh, H] -> [K, N * G, H], padded so that the last row's span read stays in bounds.
  qf = q.reshape(ntok, kh, g, h).transpose(1, 0, 2, 3).reshape(kh, ntok * g, h)
  qf = _pad(_pad(qf, 1, ntok * g + mp), 2, hp)
  pos = start.astype(jnp.int32)[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]  # [B, W]
  row_spec = pl.BlockSpec((1,), lambda b_, k_, i: (b_,))
  ins = [(qf, pl.BlockSpec((None, ntok * g + mp, hp), lambda b_, k_, i: (k_, 0, 0))),
         (_rows(pos, g, mp), pl.BlockSpec((None, tm), lambda b_, k_, i: (b_, i))),
         (offsets, row_spec), (counts, row_spec)]
  spec, more = _kv_inputs(cache, meta, b=b, t=w, g=g, tm=tm, mp=mp, hp=hp, hvp=hvp, block_k=block_k)
  segs = [spec]
  ins += more
  if own is not None:
    wk = _pow2_ceil(w)  # one tile: the row's W own keys
    kf = _pad(_pad(own["k"].transpose(1, 2, 0), 1, hp), 2, ntok + wk)  # [K, Hp, N + Wk]
    vf = _pad(_pad(own["v"].transpose(1, 0, 2), 2, hvp), 1, ntok + wk)  # [K, N + Wk, Hvp]
    ins += [(kf, pl.BlockSpec((None, hp, ntok + wk), lambda b_, k_, i: (k_, 0, 0))),
            (vf, pl.BlockSpec((None, ntok + wk, hvp), lambda b_, k_, i: (k_, 0, 0))),
            (_pad(pos, 1, wk), pl.BlockSpec((None, wk), lambda b_, k_, i: (b_, 0))),
            (_rows(jnp.broadcast_to(counts[:, None], (b, w)), g, mp),
             pl.BlockSpec((None, tm), lambda b_, k_, i: (b_, i)))]
    names = ["k", "v", "positions", "lengths"]
    if own["mask"] is not None:
      om = own["mask"].astype(jnp.int32)
      shared = om.ndim == 2
      om = _pad(_rows(om[None] if shared else om, g, mp), 2, wk)
      ins.append((om, pl.BlockSpec((None, tm, wk), (lambda b_, k_, i: (0, i, 0)) if shared
                                   else (lambda b_, k_, i: (b_, i, 0)))))
      names.append("mask")
    segs.append(_Seg("kv", wk, w, wk, tuple(names), causal=True, window=meta[2], flat=True))
  plan = _Plan(tuple(segs), g, m, tm, scale, softcap, qpos=True, ragged=True)
  out = _launch(plan, ins, (b, kh, mp, hvp), q.dtype, hp, interpret, "ragged_segment_attention")
  dense = out[:, :, :m, :hv].reshape(b, kh, w, g, hv).transpose(0, 2, 1, 3, 4)
  dense = dense.reshape(b, w, n, hv)
  return dense[jnp.minimum(rows, b - 1), cols]  # Pack.to_flat: padding reads row B-1
