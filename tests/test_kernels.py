"""Pallas kernels against their pure-jnp references, the dispatcher, and the call sites.

On CPU every kernel runs in interpret mode (the kernel body executed with XLA ops), which
checks its indexing, tiling and carries exactly; the same cases run compiled under the
`gpu` marker (DSPARK_TEST_GPU=1 on a GPU machine). Shapes are odd on purpose: a vocabulary
that is not a multiple of the tile, P = 1, B = 3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dspark_jax as dj
from dspark_jax.decoding import sampling, speculative
from dspark_jax.decoding.state import Proposal
from dspark_jax.demo import tiny as testing
from dspark_jax.drafts import api as draft_api
from dspark_jax.drafts import heads, runtime
from dspark_jax.kernels import attention, dispatch, draw
from dspark_jax.kernels.markov_sampler import pallas as ms_pallas
from dspark_jax.kernels.markov_sampler import reference as ms_ref
from dspark_jax.kernels.prefix_accept import pallas as pa_pallas
from dspark_jax.kernels.prefix_accept import reference as pa_ref

# Compiled runs need power-of-two tiles and, for the Markov dot, >= 16 rows / rank / columns.
COMPILED = [pytest.param(True, id="interpret"),
            pytest.param(False, id="compiled", marks=pytest.mark.gpu)]


@pytest.fixture
def kernels_env(monkeypatch):
  """Sets DSPARK_KERNELS for one test (read when a function is traced: eager calls see it at
  once; jitted programs need `jax.clear_caches()`)."""
  def use(value):
    if value is None:
      monkeypatch.delenv("DSPARK_KERNELS", raising=False)
    else:
      monkeypatch.setenv("DSPARK_KERNELS", value)
  return use


def _keys(seed, n):
  return jax.random.split(jax.random.key(seed), n)


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------
def test_dispatch_env_selection_and_cpu_interpret(kernels_env):
  kw = dict(compiled_on=("gpu",), auto_on=("gpu",))
  kernels_env(None)
  assert dispatch.resolve("op", **kw) == dispatch.Choice(pallas=False)  # auto on CPU: xla
  kernels_env("xla")
  assert dispatch.resolve("op", **kw) == dispatch.Choice(pallas=False)
  kernels_env("pallas")
  assert dispatch.resolve("op", **kw) == dispatch.Choice(pallas=True, interpret=True)
  assert dispatch.resolve("op", "xla", **kw) == dispatch.Choice(pallas=False)  # argument wins
  kernels_env("triton")
  with pytest.raises(ValueError, match="unknown kernel implementation 'triton'"):
    dispatch.resolve("op", **kw)


def test_dispatch_auto_and_forced_on_accelerators(monkeypatch):
  monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
  kw = dict(compiled_on=("gpu",), auto_on=("gpu",))
  assert dispatch.resolve("op", "auto", **kw) == dispatch.Choice(pallas=True)
  assert dispatch.resolve("op", "pallas", **kw) == dispatch.Choice(pallas=True)
  # auto falls back where the kernel does not apply or is not enabled by default ...
  assert not dispatch.resolve("op", "auto", unsupported="gated head", **kw).pallas
  assert not dispatch.resolve("op", "auto", compiled_on=("gpu",)).pallas
  # ... while a forced kernel that cannot run says why, on one line.
  with pytest.raises(dispatch.KernelUnavailable, match=r"op: .*\(gated head\).*xla") as e:
    dispatch.resolve("op", "pallas", unsupported="gated head", **kw)
  assert "\n" not in str(e.value)
  monkeypatch.setattr(dispatch, "platform", lambda: "tpu")
  assert not dispatch.resolve("op", "auto", **kw).pallas
  with pytest.raises(dispatch.KernelUnavailable, match="platform 'tpu'") as e:
    dispatch.resolve("op", "pallas", **kw)
  assert "\n" not in str(e.value)


def test_attention_dispatches_to_its_kernel(kernels_env):
  """Segment attention has a Pallas backend like every op (its own cases are in
  tests/test_attention_kernel.py): forced, it runs interpreted on CPU; "auto" keeps the
  reference until the kernel is measured on a GPU."""
  assert attention.IMPLEMENTATIONS == ("xla", "pallas")
  k = _keys(3, 3)
  q = jax.random.normal(k[0], (1, 2, 2, 4))
  seg = attention.KV(jax.random.normal(k[1], (1, 1, 4, 3)), jax.random.normal(k[2], (1, 1, 3, 4)),
                     causal=False)
  kernels_env(None)
  assert attention.choose() == dispatch.Choice(pallas=False)
  kernels_env("pallas")  # process-wide: attention runs its kernel too
  assert attention.choose() == dispatch.Choice(pallas=True,
                                               interpret=dispatch.platform() == "cpu")
  with jax.default_matmul_precision("highest"):  # the XLA side's f32 dots on a GPU: not TF32
    want = attention.attention(q, seg, scale=0.5, implementation="xla")
    got = attention.attention(q, seg, scale=0.5)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_attention_prefix_spans():
  assert attention.prefix_spans(320) == (320,)  # no prefix below a third: slicing costs more
  assert attention.prefix_spans(1024) == (256, 1024)
  assert attention.prefix_spans(4096) == (256, 1024, 4096)
  assert attention.prefix_spans(8326) == (256, 1024, 8326)  # a server slot (SmolLM2)


@pytest.mark.parametrize("extent", [1, 200, 256, 257, 1024, 1025, 4096])
def test_attention_extent_reads_a_prefix_with_the_same_result(extent):
  """A causal cache read only up to a bucketed prefix covering `extent` equals the read of
  the whole cache, with GQA, a window and a second (block) segment, at every span bucket."""
  b, t, k, g, h, s = 2, 3, 2, 3, 8, 4096
  keys = _keys(7, 6)
  q = jax.random.normal(keys[0], (b, t, k * g, h))
  kc = jax.random.normal(keys[1], (b, k, h, s))
  vc = jax.random.normal(keys[2], (b, k, s, h))
  pos = jnp.stack([jnp.arange(t) + extent - t, jnp.arange(t) + max(extent // 2 - t, 0)])
  pos = jnp.maximum(pos, 0).astype(jnp.int32)
  blk = attention.Block(jax.random.normal(keys[3], (b, t, k, h)),
                        jax.random.normal(keys[4], (b, t, k, h)), group=t)
  for window in (None, 64):
    seg = attention.KV(kc, vc, window=window)
    full = attention.attention(q, seg, blk, q_positions=pos, scale=0.3)
    part = jax.jit(lambda e, seg=seg: attention.attention(q, seg, blk, q_positions=pos,
                                                          scale=0.3, extent=e))(extent)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# inverse-CDF draw (shared by the sampler and every sampling kernel)
# ---------------------------------------------------------------------------------------------
def _draw_weights(v, seed):
  w = jax.random.exponential(jax.random.key(seed), (v,)) ** 3
  return w.at[::7].set(0.0).at[0].set(0.0).at[-1].set(0.0)  # zeros, also at both ends


def test_inverse_cdf_draws_the_weights_distribution():
  """One uniform per row: tokens follow w / sum(w) and a zero weight is never drawn."""
  from test_speculative import _chi2_pvalue
  v, n = 700, 200_000
  w = _draw_weights(v, 0)
  tok = np.asarray(draw.inverse_cdf(jax.random.uniform(jax.random.key(1), (n,)),
                                    jnp.broadcast_to(w, (n, v))))
  counts = np.bincount(tok, minlength=v)
  assert counts[np.asarray(w) == 0].sum() == 0
  assert _chi2_pvalue(counts, np.asarray(w / w.sum())) > 1e-3
  # the extremes: u = 0 is the first positive column (a search counting prefixes < target
  # would return column 0, whose weight is 0), u -> 1 the last (rounding included)
  ends = draw.inverse_cdf(jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))]),
                          jnp.stack([w, w]))
  positive = np.flatnonzero(np.asarray(w) > 0)
  assert np.asarray(ends).tolist() == [positive[0], positive[-1]]


@pytest.mark.parametrize("v,tile", [(301, 64), (37, 16), (64, 64)])
def test_tiled_draw_is_the_reference_draw(v, tile):
  """`tile_count` over overlapping vocabulary tiles (as every kernel runs it) == `inverse_cdf`."""
  b = 256
  w = jnp.stack([_draw_weights(v, s) for s in range(b)])
  u = jax.random.uniform(jax.random.key(2), (b,))
  want = draw.inverse_cdf(u, w)
  target = u * jnp.sum(w, axis=1)
  carry, last = (jnp.zeros((b,)), jnp.zeros((b,), jnp.int32)), jnp.full((b,), -1, jnp.int32)
  for j in range(-(-v // tile)):
    start = min(j * tile, v - tile)
    fresh = (start + jnp.arange(tile) >= j * tile)[None]
    carry = draw.tile_count(w[:, start:start + tile], fresh, target, carry)
    last = draw.tile_last_positive(w[:, start:start + tile], fresh, start, last)
  got = draw.finish(carry[1], last, v)
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# markov sampler
# ---------------------------------------------------------------------------------------------
# (B, P, N, R, tile): N not a multiple of the tile, P = 1, N a multiple, a tile wider than N.
MARKOV_SHAPES = [(3, 5, 301, 16, 64), (1, 1, 37, 16, 16), (3, 4, 64, 16, 32), (2, 3, 20, 16, 32)]
MODES = ["greedy", "sampled", "mixed_rows"]


def _markov_inputs(b, p, n, r, mode, dtype=jnp.float32, seed=0):
  k = _keys(seed, 6)
  base = jax.random.normal(k[0], (b, p, n)) * 2.0
  w1 = jax.random.normal(k[1], (n, r), dtype)
  w2 = (jax.random.normal(k[2], (r, n)) * 0.5).astype(dtype)
  e0 = jax.random.normal(k[3], (b, r), dtype)
  kw = {}
  if mode != "greedy":
    kw = dict(uniforms=jax.random.uniform(k[4], (b, p)),
              temperature=jnp.linspace(0.5, 1.5, b).astype(jnp.float32))
  if mode == "mixed_rows":
    kw["greedy_rows"] = jnp.arange(b) % 2 == 1
  return (base, e0, w1, w2), kw


def _gpu_block(interpret, b):
  return None if interpret else 16


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", MARKOV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_markov_kernel_matches_reference(shape, mode, interpret):
  b, p, n, r, tile = shape
  args, kw = _markov_inputs(b, p, n, r, mode)
  want_tok, want_z = ms_ref.markov_sample(*args, **kw)
  tok, z = ms_pallas.markov_sample(*args, **kw, tile=tile, block_b=_gpu_block(interpret, b),
                                   interpret=interpret)
  np.testing.assert_array_equal(tok, want_tok)
  np.testing.assert_allclose(z, want_z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret", COMPILED)
def test_markov_kernel_bf16_and_padded_row_blocks(interpret):
  """bf16 weights (the bias rounds to bf16 as the head's Linear does); B=3 in blocks of 2."""
  args, kw = _markov_inputs(3, 3, 301, 16, "sampled", dtype=jnp.bfloat16, seed=1)
  want_tok, want_z = ms_ref.markov_sample(*args, **kw)
  tok, z = ms_pallas.markov_sample(*args, **kw, tile=64, block_b=2 if interpret else 16,
                                   interpret=interpret)
  np.testing.assert_array_equal(tok, want_tok)
  # Both round the same float32 dot to bf16, but accumulate it in a different order, so a
  # bias may land one bf16 step (8 significant bits) apart: the bound is that step.
  bias = np.abs(np.asarray(want_z) - np.asarray(args[0]))
  step = 2.0 ** (np.floor(np.log2(np.maximum(bias, 1e-30))) - 7)
  assert np.all(np.abs(np.asarray(z) - np.asarray(want_z)) <= step + 1e-5)


def _head(vocab, rank, hidden, kind="vanilla"):
  rngs = nnx.Rngs(3)
  return (heads.HEADS[kind](vocab, rank, hidden, dtype=jnp.float32, rngs=rngs),
          heads.ConfidenceHead(hidden + rank, dtype=jnp.float32, rngs=rngs))


def _runtime_case(params, vocab_ids=None, b=3, p=4, v=45, r=8, d=16, kind="vanilla"):
  markov, conf = _head(v, r, d, kind)
  k = _keys(7, 4)
  n = v if vocab_ids is None else len(vocab_ids)
  base = jax.random.normal(k[0], (b, p, n)) * 3.0
  hidden = jax.random.normal(k[1], (b, p, d))
  anchor = jax.random.randint(k[2], (b,), 0, v, jnp.int32)
  ids = None if vocab_ids is None else jnp.asarray(vocab_ids, jnp.int32)
  return lambda: runtime.sequential_sample(markov, conf, True, base, hidden, anchor,
                                           jax.random.split(k[3], b), params, ids)


SAMPLINGS = {"greedy": sampling.SamplingParams.make(0.0),
             "t0.7": sampling.SamplingParams.make(0.7),
             "per_row": sampling.SamplingParams.for_rows([0.0, 0.8, 1.3], [0, 0, 0], [1, 1, 1])}


@pytest.mark.parametrize("reduced", [False, True], ids=["full_vocab", "draft_vocab"])
@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_runtime_sampler_reference_and_kernel_agree(kernels_env, name, reduced):
  """`sequential_sample` today == the reference (bitwise) == the kernel path (tokens)."""
  params = SAMPLINGS[name]
  ids = [0, 3, 4, 9, 11, 17, 20, 21, 30, 31, 40, 44, 2, 5, 7, 8, 13] if reduced else None
  run = _runtime_case(params, ids)
  kernels_env(None)
  want = run()
  kernels_env("pallas")
  got = run()
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-6, atol=1e-6)
  if not reduced:  # the reference, fed the runtime's own uniforms, is the runtime bit for bit
    markov, _ = _head(45, 8, 16)
    b, p = want.tokens.shape
    k = _keys(7, 4)
    base = jax.random.normal(k[0], (b, p, 45)) * 3.0
    anchor = jax.random.randint(k[2], (b,), 0, 45, jnp.int32)
    kw = {}
    if not params.greedy:
      keys = jax.random.split(k[3], b)
      kw = dict(uniforms=jnp.stack([draw.uniforms(
          runtime.position_keys(keys, j)) for j in range(p)], axis=1),
          temperature=jnp.broadcast_to(params.temperature, (b,)),
          greedy_rows=None if jnp.ndim(params.temperature) == 0 else params.temperature <= 0)
    tok, z = ms_ref.markov_sample(base, markov.embed_prev(anchor, jnp.float32),
                                  markov.markov_w1.embedding[...], markov.markov_w2.kernel[...],
                                  **kw)
    np.testing.assert_array_equal(tok, want.tokens)
    np.testing.assert_array_equal(z, want.logits)


def test_runtime_sampler_forced_kernel_that_cannot_fuse_is_a_clear_error(kernels_env):
  kernels_env("pallas")
  with pytest.raises(dispatch.KernelUnavailable, match="gated Markov head"):
    _runtime_case(SAMPLINGS["greedy"], kind="gated")()
  with pytest.raises(dispatch.KernelUnavailable, match="top-k/top-p"):
    _runtime_case(sampling.SamplingParams.make(0.7, top_k=5))()
  kernels_env("auto")  # auto keeps the unfused path for both
  assert _runtime_case(SAMPLINGS["greedy"], kind="gated")().tokens.shape == (3, 4)


# ---------------------------------------------------------------------------------------------
# prefix accept
# ---------------------------------------------------------------------------------------------
ACCEPT_SHAPES = [(3, 4, 301, 64), (1, 1, 37, 16), (3, 5, 64, 32)]  # (B, P, V, tile)


def _accept_inputs(b, p, v, seed=0):
  """Target logits and a proposal close to them (mixed acceptance), plus the round's keys."""
  k = _keys(seed, 5)
  t_logits = jax.random.normal(k[0], (b, p + 1, v)) * 2.0
  d_logits = t_logits[:, :p] + jax.random.normal(k[1], (b, p, v)) * 0.7
  drafts = jax.random.categorical(k[2], d_logits).astype(jnp.int32)
  ell = jnp.asarray([p, max(p - 2, 0), 0][:b] if b > 1 else [p], jnp.int32)
  return t_logits, Proposal(tokens=drafts, logits=d_logits, confidence=None), ell, k[3], k[4]


def _accept_randomness(pt, p, keys_accept, keys_sample):
  u = jax.vmap(lambda key: jax.random.uniform(key, (p,)))(keys_accept)
  return u, draw.uniforms(keys_sample)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
@pytest.mark.parametrize("shape", ACCEPT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_accept_reference_is_the_existing_rule(kernels_env, shape, greedy):
  b, p, v, _ = shape
  kernels_env(None)
  params = sampling.SamplingParams.make(0.0 if greedy else 1.0)
  seen = set()
  for seed in range(4):
    t_logits, prop, ell, ka, ks = _accept_inputs(b, p, v, seed)
    ka, ks = jax.random.split(ka, b), jax.random.split(ks, b)
    want = speculative.accept(t_logits, prop, ell, ka, ks, params)
    if greedy:
      drafts = jnp.argmax(t_logits[:, :p], -1).astype(jnp.int32)  # accept a prefix
      drafts = drafts.at[:, p // 2].set((drafts[:, p // 2] + 1) % v)
      prop = Proposal(tokens=drafts, logits=prop.logits, confidence=None)
      want = speculative.accept(t_logits, prop, ell, ka, ks, params)
      got = pa_ref.greedy_accept(t_logits, prop.tokens, ell)
    else:
      pt = sampling.probabilities(t_logits, params)
      qd = sampling.probabilities(prop.logits, params)
      got = pa_ref.prefix_accept(pt, qd, prop.tokens, ell, *_accept_randomness(pt, p, ka, ks))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    seen.update(np.asarray(want[0]).tolist())
  if p > 1:
    assert len(seen) > 1  # the cases exercise more than one outcome


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("shape", ACCEPT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_accept_kernel_matches_reference(shape, interpret):
  b, p, v, tile = shape
  for seed in range(3):
    t_logits, prop, ell, ka, ks = _accept_inputs(b, p, v, seed)
    pt = jax.nn.softmax(t_logits, -1)
    qd = jax.nn.softmax(prop.logits, -1)
    u, su = _accept_randomness(pt, p, jax.random.split(ka, b), jax.random.split(ks, b))
    want = pa_ref.prefix_accept(pt, qd, prop.tokens, ell, u, su)
    got = pa_pallas.prefix_accept(pt, qd, prop.tokens, ell, u, su, tile=tile,
                                  interpret=interpret)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # greedy: drafts = the target's argmax except at one slot
    drafts = jnp.argmax(t_logits[:, :p], -1).astype(jnp.int32)
    drafts = drafts.at[:, (seed + 1) % p].set((drafts[:, (seed + 1) % p] + 1) % v)
    want = pa_ref.greedy_accept(t_logits, drafts, ell)
    got = pa_pallas.greedy_accept(t_logits, drafts, ell, tile=tile, interpret=interpret)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_accept_kernel_one_hot_rows():
  """Per-row greedy rows reach the kernel as one-hot p and q: rejection -> the target token."""
  v = 21
  p_tok = jnp.asarray([[3, 4, 5], [3, 4, 5]], jnp.int32)
  pt = jax.nn.one_hot(p_tok, v)
  drafts = jnp.asarray([[3, 9], [3, 4]], jnp.int32)
  qd = jax.nn.one_hot(drafts, v)
  u = jnp.full((2, 2), 0.5)
  ell = jnp.asarray([2, 2], jnp.int32)
  n, tok = pa_pallas.prefix_accept(pt, qd, drafts, ell, u, jnp.asarray([0.3, 0.99]), tile=16,
                                   interpret=True)
  assert np.asarray(n).tolist() == [1, 2] and np.asarray(tok).tolist() == [4, 5]


def test_accept_call_site_with_kernels_equals_default(kernels_env):
  b, p, v = 3, 4, 301
  t_logits, prop, ell, ka, ks = _accept_inputs(b, p, v, 5)
  ka, ks = jax.random.split(ka, b), jax.random.split(ks, b)
  for params in (SAMPLINGS["greedy"], SAMPLINGS["t0.7"], SAMPLINGS["per_row"]):
    kernels_env(None)
    want = speculative.accept(t_logits, prop, ell, ka, ks, params)
    kernels_env("pallas")
    got = speculative.accept(t_logits, prop, ell, ka, ks, params)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "t1"])
def test_speculative_generation_with_pallas_kernels_equals_default(kernels_env, monkeypatch,
                                                                   temperature):
  """Kernels on give the tokens of kernels off (same randomness), greedy and sampled: with
  the distribution tests of the reference path, the kernels' outputs are exact too."""
  cfg = testing.tiny_config("qwen3", vocab=12, layers=3)
  target = testing.random_target(cfg, scale=12.0, seed=2)
  draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                               target_layer_ids=(0, 1), markov_rank=8, seed=1,
                               markov_head_type="vanilla")
  prompts = [[1, 5, 9, 3, 10], [4, 2, 9], [7, 7]]
  kw = dict(draft=draft, max_new_tokens=9, stop_tokens=[], temperature=temperature, seed=5)
  kernels_env(None)
  want = dj.generate(target, prompts, **kw)
  if temperature == 0:
    assert want.tokens == dj.generate(target, prompts, max_new_tokens=9, stop_tokens=[]).tokens
  accept_name = "greedy_accept" if temperature == 0 else "prefix_accept"
  calls = []
  for mod, name in ((ms_pallas, "markov_sample"), (pa_pallas, accept_name)):
    fn = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
  kernels_env("pallas")
  jax.clear_caches()  # the loop program traced above chose the XLA paths
  try:
    got = dj.generate(target, prompts, **kw)
  finally:
    jax.clear_caches()
  assert set(calls) == {"markov_sample", accept_name}  # the kernels were traced in
  assert got.tokens == want.tokens
  assert got.stats.accept_lengths == want.stats.accept_lengths
