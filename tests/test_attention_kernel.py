"""The segment-attention Pallas kernel against its pure-jnp reference, the dispatcher, a model.

On CPU the kernel runs in interpret mode (its body executed with XLA ops: the tiling, the
overlapping tail tiles, the online softmax and every visibility rule are checked exactly);
the same cases run compiled under the `gpu` marker (DSPARK_TEST_GPU=1 on a GPU machine),
with float32 dots at full precision on both sides, and every run lowers the kernel for
CUDA (Triton) at the GPU tiles, which needs no GPU. Shapes are odd on purpose: S = 37
keys, T * G rows that are no multiple of the 16-row tile, B = 3, a head dim of 8 (padded).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.decoding.cache import KVCache
from dspark_jax.decoding.state import Pack
from dspark_jax.demo import tiny as testing
from dspark_jax.kernels import attention, dispatch
from dspark_jax.kernels.attention import api
from dspark_jax.kernels.attention import pallas as att_pallas
from dspark_jax.kernels.attention import reference as ref

COMPILED = [pytest.param(True, id="interpret"),
            pytest.param(False, id="compiled", marks=pytest.mark.gpu)]
TILE = dict(block_q=16, block_k=16)  # several row and key tiles even at these sizes
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


# Inputs come from numpy: every jax.random call of a new shape is one more (slow) CPU compile.
def _normal(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _bits(rng, p, shape):
  return rng.random(shape) < p  # numpy: edited in place by some cases before use


def _close(got, want, dtype=jnp.float32):
  assert got.shape == want.shape and got.dtype == want.dtype
  tol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)


@pytest.fixture(autouse=True)
def _full_precision():
  """float32 dots at full precision on both sides (XLA-GPU's default for them is TF32, the
  kernel's IEEE); a no-op on CPU."""
  with jax.default_matmul_precision("highest"):
    yield


def _reference(*args, **kw):
  """`ref.attention`, jitted: one compile instead of one per eager op."""
  return jax.jit(lambda: ref.attention(*args, **kw))()


def _cache(rng, b, kh, h, s, dtype, hv=None):
  return _normal(rng, (b, kh, h, s), dtype), _normal(rng, (b, kh, s, hv or h), dtype)


# (name, B, T, K, G, H, S, KV options, softcap). Positions run from 30 (row 0: the window and
# lengths cut the cache), 3 (row 1: most keys in the future) and 0 (row 2).
KV_CASES = [
    ("gqa1_lengths", 3, 5, 2, 1, 8, 37, dict(lengths="row"), None),
    ("gqa2_window_softcap_query_lengths", 3, 5, 2, 2, 8, 37,
     dict(lengths="query", window=6), 5.0),
    ("gqa4_positions_shared_mask", 3, 5, 1, 4, 16, 37, dict(positions=True, mask="shared"), None),
    ("gqa3_row_mask_not_causal", 2, 7, 2, 3, 8, 37, dict(mask="row", causal=False), 2.0),
    ("tiny_cache", 3, 9, 2, 2, 8, 5, dict(lengths="row"), None),
]


def _kv_segment(seed, b, t, kh, h, s, opts, dtype):
  rng = np.random.default_rng(seed)
  kc, vc = _cache(rng, b, kh, h, s, dtype)
  lengths = None
  if opts.get("lengths") == "row":
    lengths = jnp.asarray([35, 8, 0][:b], jnp.int32)  # 0: a fully masked row
  elif opts.get("lengths") == "query":
    lengths = jnp.asarray(rng.integers(0, s + 1, (b, t)), jnp.int32)
  positions = None
  if opts.get("positions"):
    positions = jnp.asarray(np.broadcast_to(np.arange(s)[::-1] // 2 + 3, (b, s)), jnp.int32)
  mask = None
  if opts.get("mask") == "shared":
    mask = _bits(rng, 0.6, (t, s))
    mask[1] = False  # query 1 sees nothing
  elif opts.get("mask") == "row":
    mask = _bits(rng, 0.4, (b, t, s))
  return ref.KV(kc, vc, positions=positions, lengths=lengths, causal=opts.get("causal", True),
                window=opts.get("window"), mask=None if mask is None else jnp.asarray(mask))


def _q_positions(b, t):
  return jnp.asarray(np.asarray([30, 3, 0][:b])[:, None] + np.arange(t)[None], jnp.int32)


def _with_dtypes(cases, bf16):
  """Every case in float32, the named ones in bfloat16 too (interpret mode is slow)."""
  out = [pytest.param(c, jnp.float32, id=f"{c[0]}-f32") for c in cases]
  return out + [pytest.param(c, jnp.bfloat16, id=f"{c[0]}-bf16") for c in cases if c[0] in bf16]


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("case, dtype", _with_dtypes(
    KV_CASES, ("gqa2_window_softcap_query_lengths", "gqa3_row_mask_not_causal")))
def test_kv_segment_matches_reference(case, dtype, interpret):
  _, b, t, kh, g, h, s, opts, softcap = case
  q = _normal(np.random.default_rng(1), (b, t, kh * g, h), dtype)
  seg = _kv_segment(2, b, t, kh, h, s, opts, dtype)
  kw = dict(q_positions=_q_positions(b, t), scale=0.4, softcap=softcap)
  _close(att_pallas.attention(q, seg, **kw, **TILE, interpret=interpret),
         _reference(q, seg, **kw), dtype)


@pytest.mark.parametrize("interpret", COMPILED)
def test_cache_plus_own_keys_and_value_dim(interpret):
  """A verify step's two segments: the cache (committed lengths) and the block's own keys
  (S = 4 < 16, padded), causal by position; values wider than keys (Hv = 16, H = 8)."""
  b, t, kh, g, h, hv, s = 3, 4, 2, 2, 8, 16, 37
  rng = np.random.default_rng(2)
  q = _normal(rng, (b, t, kh * g, h))
  start = jnp.asarray([20, 0, 33], jnp.int32)
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  cache = ref.KV(*_cache(rng, b, kh, h, s, jnp.float32, hv), lengths=start, window=9)
  own_k, own_v = _cache(rng, b, kh, h, t, jnp.float32, hv)
  own = ref.KV(own_k, own_v, positions=pos, lengths=jnp.asarray([4, 2, 0], jnp.int32), window=9)
  kw = dict(q_positions=pos, scale=0.3)
  _close(att_pallas.attention(q, cache, own, **kw, **TILE, interpret=interpret),
         _reference(q, cache, own, **kw))


# (name, T, group, valid, with a KV context first)
BLOCK_CASES = [
    ("draft_block", 6, 6, False, True),  # DSpark/DFlash: one bidirectional block per row
    ("eagle3_diagonal", 19, 1, True, True),  # group 1: each query its own key, some invalid
    ("groups_of_2_alone", 10, 2, True, False),  # 5 groups, tiles that straddle groups
]


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("case, dtype", _with_dtypes(BLOCK_CASES, ("draft_block",)))
def test_block_segments_match_reference(case, dtype, interpret):
  _, t, group, with_valid, with_ctx = case
  b, kh, g, h, s = 3, 2, 2, 8, 21
  rng = np.random.default_rng(3)
  q = _normal(rng, (b, t, kh * g, h), dtype)
  valid = None
  if with_valid:
    valid = _bits(rng, 0.6, (b, t // group))
    valid[:, 0] = False
    valid = jnp.asarray(valid)
  blk = ref.Block(_normal(rng, (b, t, kh, h), dtype), _normal(rng, (b, t, kh, h), dtype),
                  group=group, valid=valid)
  segs = (blk,)
  if with_ctx:  # a context cache (lengths only; row 2 empty), then one or two blocks
    ctx = ref.KV(*_cache(rng, b, kh, h, s, dtype), lengths=jnp.asarray([21, 5, 0]),
                 causal=False)
    segs = (ctx, blk, blk) if group == 1 else (ctx, blk)
  kw = dict(scale=0.35, softcap=None if group > 1 else 3.0)
  _close(att_pallas.attention(q, *segs, **kw, **TILE, interpret=interpret),
         _reference(q, *segs, **kw), dtype)


@pytest.mark.parametrize("interpret", COMPILED)
def test_fully_masked_queries_give_the_reference_uniform_row(interpret):
  """A query that sees no key averages every key of its segments (the reference's finite
  mask value), an invalid Block group's keys included, other groups' keys not."""
  b, t, kh, g, h, s = 2, 4, 1, 2, 8, 37
  rng = np.random.default_rng(4)
  q = _normal(rng, (b, t, kh * g, h))
  seg = ref.KV(*_cache(rng, b, kh, h, s, jnp.float32), lengths=jnp.asarray([0, 3]),
               causal=False)
  blk = ref.Block(_normal(rng, (b, t, kh, h)), _normal(rng, (b, t, kh, h)),
                  group=2, valid=jnp.asarray([[False, True], [False, False]]))
  want = _reference(q, seg, blk, scale=0.5)
  got = att_pallas.attention(q, seg, blk, scale=0.5, **TILE, interpret=interpret)
  _close(got, want)
  uniform = (seg.v[0, 0].sum(0) + blk.v[0, :2, 0].sum(0)) / (s + 2)  # row 0, queries 0-1
  np.testing.assert_allclose(np.asarray(got[0, :2]), np.broadcast_to(uniform, (2, g, h)),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ragged (packed verify)
# ---------------------------------------------------------------------------------------------
def _ragged_case(seed, dtype=jnp.float32, mask=None, w=5, g=2):
  """Rows of 3, 0, 5 tokens (an empty row) packed into a budget of 10 (2 padding tokens)."""
  b, kh, h, s = 3, 2, 8, 37
  rng = np.random.default_rng(seed)
  valid = jnp.arange(w)[None, :] < jnp.asarray([3, 0, 5])[:, None]
  start = jnp.asarray([20, 4, 32], jnp.int32)
  _, pack = Pack.build(jnp.zeros((b, w), jnp.int32), valid, start, 10)
  n = pack.rows.shape[0]
  q = _normal(rng, (n, kh * g, h), dtype)
  k = _normal(rng, (n, kh, h), dtype)
  v = _normal(rng, (n, kh, h), dtype)
  cache = ref.KV(*_cache(rng, b, kh, h, s, dtype), lengths=start, window=7)
  own_mask = None
  if mask == "shared":
    own_mask = jnp.asarray(np.tril(_bits(rng, 0.5, (w, w))) | np.eye(w, dtype=bool))
  elif mask == "row":
    own_mask = jnp.asarray(_bits(rng, 0.5, (b, w, w)))
  return pack, q, k, v, cache, dict(rows=pack.rows, cols=pack.cols, start=start, width=w,
                                    scale=0.3, softcap=4.0, mask=own_mask)


def test_ragged_reference_is_the_dense_pack_composition():
  """`ragged_attention` is what the model's packed verify computes with `Pack`."""
  pack, q, k, v, cache, kw = _ragged_case(5)

  @jax.jit
  def both():
    own = ref.KV(pack.to_dense(k[None]).transpose(0, 2, 3, 1),
                 pack.to_dense(v[None]).transpose(0, 2, 1, 3), positions=pack.positions,
                 lengths=jnp.sum(pack.valid, axis=1), window=cache.window)
    dense = ref.attention(pack.to_dense(q[None]), cache, own, q_positions=pack.positions,
                          scale=kw["scale"], softcap=kw["softcap"])
    return ref.ragged_attention(q, cache, k, v, **kw), pack.to_flat(dense)[0]

  got, want = both()
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("variant", ["own", "own_shared_mask", "own_row_mask_gqa4", "cache_only",
                                     "bf16"])
def test_ragged_kernel_matches_reference(variant, interpret):
  dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
  mask = {"own_shared_mask": "shared", "own_row_mask_gqa4": "row"}.get(variant)
  pack, q, k, v, cache, kw = _ragged_case(6, dtype, mask, g=4 if "gqa4" in variant else 2)
  if variant == "cache_only":
    k = v = None
    kw = dict(kw, mask=None)
  want = jax.jit(lambda: ref.ragged_attention(q, cache, k, v, **kw))()
  got = att_pallas.ragged_attention(q, cache, k, v, **kw, **TILE, interpret=interpret)
  _close(got, want, dtype)


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------
def _small_call():
  rng = np.random.default_rng(8)
  q = _normal(rng, (2, 3, 4, 8))
  seg = ref.KV(*_cache(rng, 2, 2, 8, 20, jnp.float32), lengths=jnp.asarray([20, 7]))
  return q, seg, dict(q_positions=jnp.asarray([[17, 18, 19], [4, 5, 6]]), scale=0.5)


def test_dispatch_env_runs_the_kernel_interpreted_on_cpu(monkeypatch):
  q, seg, kw = _small_call()
  calls = []
  kernel = att_pallas.attention
  monkeypatch.setattr(att_pallas, "attention",
                      lambda *a, **k: calls.append(k["interpret"]) or kernel(*a, **k))
  want = ref.attention(q, seg, **kw)
  monkeypatch.delenv("DSPARK_KERNELS", raising=False)
  np.testing.assert_array_equal(np.asarray(attention.attention(q, seg, **kw)), np.asarray(want))
  monkeypatch.setenv("DSPARK_KERNELS", "xla")
  np.testing.assert_array_equal(np.asarray(attention.attention(q, seg, **kw)), np.asarray(want))
  assert calls == []  # auto on CPU and xla: the reference
  monkeypatch.setenv("DSPARK_KERNELS", "pallas")
  _close(attention.attention(q, seg, **kw), want)
  cpu = dispatch.platform() == "cpu"
  assert calls == [cpu]  # interpreted on CPU
  monkeypatch.setenv("DSPARK_KERNELS", "xla")
  _close(attention.attention(q, seg, **kw, implementation="pallas"), want)  # argument wins
  assert calls == [cpu, cpu]


def test_dispatch_on_accelerators(monkeypatch):
  q, seg, kw = _small_call()
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  assert api.choose("auto", q=q, segments=(seg,)) == dispatch.Choice(pallas=False)  # not yet
  assert api.choose("pallas", q=q, segments=(seg,)) == dispatch.Choice(pallas=True)
  wide = jnp.zeros((1, 1, 1, 512))
  big = ref.KV(jnp.zeros((1, 1, 512, 4)), jnp.zeros((1, 1, 4, 512)), causal=False)
  with pytest.raises(dispatch.KernelUnavailable, match="head dim 512") as e:
    attention.attention(wide, big, scale=1.0, implementation="pallas")
  assert "\n" not in str(e.value)
  assert attention.attention(wide, big, scale=1.0, implementation="auto").shape == wide.shape
  monkeypatch.setattr(dispatch, "platform", lambda: "tpu")
  with pytest.raises(dispatch.KernelUnavailable, match="platform 'tpu'"):
    attention.attention(q, seg, **kw, implementation="pallas")


def test_dispatch_ragged_and_extent(monkeypatch):
  """Both backends through the dispatcher, with the prefix switch: a 1024-slot cache read up
  to a 256-slot bucket (its shared tree mask sliced along) equals the full read."""
  pack, q, k, v, cache, kw = _ragged_case(9)
  want = ref.ragged_attention(q, cache, k, v, **kw)
  for impl in ("xla", "pallas"):
    _close(attention.ragged_attention(q, cache, k, v, **kw, implementation=impl), want)
  b, t, s = 2, 3, 1024
  rng = np.random.default_rng(10)
  qd = _normal(rng, (b, t, 4, 16))
  pos = jnp.asarray([[200, 201, 202], [40, 41, 42]], jnp.int32)
  big = ref.KV(*_cache(rng, b, 2, 16, s, jnp.float32), window=100,
               mask=jnp.asarray(_bits(rng, 0.7, (t, s))))
  want = ref.attention(qd, big, q_positions=pos, scale=0.25)
  for impl in ("xla", "pallas"):
    got = jax.jit(lambda e, impl=impl: attention.attention(
        qd, big, q_positions=pos, scale=0.25, implementation=impl, extent=e))(203)
    _close(got, want)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_tiny_model_logits_with_the_kernel_equal_the_reference(monkeypatch):
  """A Gemma 3 style stack (sliding window, attention soft-cap, GQA 2): full forward, cached
  prefill and a packed verify step (cache + own keys), DSPARK_KERNELS=pallas vs xla."""
  cfg = dataclasses.replace(testing.tiny_config("gemma3", vocab=32, layers=2),
                            attn_logit_softcap=20.0)
  graphdef, state = nnx.split(testing.random_target(cfg, scale=8.0, seed=3).model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9)), jnp.int32)

  @jax.jit  # one compile per backend (eager, every op of the stack compiles on its own)
  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    full = model(tokens).logits
    out = model(tokens[:, :6], cache=KVCache.init(cfg, 2, 24), attend_len=6)
    cache = out.cache.commit(jnp.asarray([6, 4], jnp.int32))
    valid = jnp.asarray([[True] * 3, [True, True, False]])
    flat, pack = Pack.build(tokens[:, 6:9], valid, cache.lengths, 6)
    verify = model(flat[None], pack.to_flat(pack.positions), cache=cache, pack=pack,
                   defer_writes=True)
    return full, out.logits, verify.logits

  monkeypatch.setenv("DSPARK_KERNELS", "xla")
  jax.clear_caches()
  want = run(state, tokens)
  calls = []
  kernel = att_pallas.attention
  monkeypatch.setattr(att_pallas, "attention",
                      lambda *a, **k: calls.append(1) or kernel(*a, **k))
  monkeypatch.setenv("DSPARK_KERNELS", "pallas")
  jax.clear_caches()  # the program traced above chose the reference
  try:
    got = run(state, tokens)
  finally:
    jax.clear_caches()
  assert calls  # the kernel was traced in
  for g_, w_ in zip(got, want):
    np.testing.assert_allclose(np.asarray(g_), np.asarray(w_), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the compiled path, short of a GPU
# ---------------------------------------------------------------------------------------------
def _lowers_to_triton(fn):
  """`fn` lowered for CUDA from this CPU machine: every op of the kernel body goes through
  Pallas' Triton lowering (power-of-two shapes, supported primitives); only Triton's own
  compile to PTX is left to a GPU run."""
  try:
    lowered = jax.jit(fn).trace().lower(lowering_platforms=("cuda",))
  except RuntimeError as e:  # a jaxlib built without the CUDA lowering
    pytest.skip(f"no cross-platform CUDA lowering here: {e}")
  assert "xla.gpu.triton" in lowered.as_text()


def test_kernel_lowers_to_triton_at_api_tiles():
  """The GPU tiles of `api` (64 x 64, 32 keys above head dim 128) on the call shapes that
  matter: a bf16 decode step over a long cache (H = 128), a draft block with its context,
  a verify step with a tree mask on its own keys, and the ragged entry."""
  rng = np.random.default_rng(11)
  gpu = api._blocks(dispatch.Choice(pallas=True), 128)
  q = _normal(rng, (2, 1, 8, 128), jnp.bfloat16)
  cache = ref.KV(*_cache(rng, 2, 2, 128, 1000, jnp.bfloat16), lengths=jnp.asarray([900, 3]))
  pos = jnp.asarray([[899], [2]], jnp.int32)
  _lowers_to_triton(lambda: att_pallas.attention(q, cache, q_positions=pos, scale=0.1, **gpu))
  q = _normal(rng, (2, 16, 8, 256), jnp.bfloat16)
  ctx = ref.KV(*_cache(rng, 2, 2, 256, 300, jnp.bfloat16), lengths=jnp.asarray([300, 7]),
               causal=False)
  blk = ref.Block(_normal(rng, (2, 16, 2, 256), jnp.bfloat16),
                  _normal(rng, (2, 16, 2, 256), jnp.bfloat16), group=16)
  wide = api._blocks(dispatch.Choice(pallas=True), 256)
  _lowers_to_triton(lambda: att_pallas.attention(q, ctx, blk, scale=0.1, **wide))
  q = _normal(rng, (2, 6, 4, 64))
  past = ref.KV(*_cache(rng, 2, 2, 64, 40, jnp.float32), lengths=jnp.asarray([40, 9]))
  pos = jnp.asarray([[40, 41, 41, 42, 42, 42], [9, 10, 10, 11, 11, 11]], jnp.int32)
  own = ref.KV(*_cache(rng, 2, 2, 64, 6, jnp.float32), positions=pos,
               mask=jnp.asarray(np.tril(np.ones((6, 6), bool))))
  _lowers_to_triton(lambda: att_pallas.attention(q, past, own, q_positions=pos, scale=0.1,
                                                 softcap=30.0, **gpu))
  pack, q, k, v, cache, kw = _ragged_case(12, jnp.bfloat16, "row")
  _lowers_to_triton(lambda: att_pallas.ragged_attention(q, cache, k, v, **kw, **gpu))
