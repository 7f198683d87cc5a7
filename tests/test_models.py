"""The target decoder against transformers: logits, KV cache, taps, full-size shapes, bad input.

Every tiny model of `hf_tiny` switches its family's features on at sizes where they move the
logits (see that module), so a parity failure here names a real divergence. References are
transformers in float32 with eager attention, each prompt run alone and unpadded; our side runs
the prompts as one right-padded (ragged) batch and only valid positions are compared.

Tolerances: 1e-4 on logits against transformers (float32; transformers is itself ~5e-5 off a
float64 run on the deepest Gemma 4 stack, see hf_tiny), 1e-5 between our own cached and
full-sequence forwards (same weights, same kernels, only the attention span differs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import safetensors.numpy  # noqa: E402
import transformers  # noqa: E402

import hf_tiny  # noqa: E402
import dspark_jax  # noqa: E402
from dspark_jax import demo  # noqa: E402
from dspark_jax.checkpoints import hf as hf_ckpt  # noqa: E402
from dspark_jax.config import ModelConfig, UnsupportedModelError  # noqa: E402
from dspark_jax.decoding import loop  # noqa: E402
from dspark_jax.decoding.cache import KVCache  # noqa: E402
from dspark_jax.decoding.state import Batch  # noqa: E402
from dspark_jax.models import transformer  # noqa: E402

NAMES = list(hf_tiny.TINY_MODELS)
PROMPTS = hf_tiny.PROMPTS  # lengths 1, 4, 13, 19: shorter and longer than every sliding window
PAD = 7  # right-padding id: any valid token; causal attention never lets a valid query see it
LOGIT_TOL = 1e-4
CACHE_TOL = 1e-5
# gemma4_e is the worst-conditioned stack (PLE gates, unscaled attention): our own full forward
# of the same rows moves by up to 2.9e-5 when only the sequence length changes (measured:
# logits(seqs[:, :16]) vs logits(seqs)[:, :16]), so 1e-5 is below its float32 noise floor.
CACHE_TOL_BY_MODEL = {"gemma4_e": 5e-5}


def right_pad(rows: list[list[int]], pad: int = PAD) -> np.ndarray:
  out = np.full((len(rows), max(map(len, rows))), pad, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  """Every tiny HF model, built once (build() also checks transformers' own reload)."""
  root = tmp_path_factory.mktemp("tiny_models")
  return {name: hf_tiny.build(name, root / name) for name in NAMES}


@pytest.fixture(scope="module")
def targets(tiny_dirs):
  """name -> our loaded float32 Target (loaded on first use)."""
  loaded = {}

  def get(name):
    if name not in loaded:
      loaded[name] = dspark_jax.load_target(tiny_dirs[name], dtype="float32")
    return loaded[name]
  return get


# ---------------------------------------------------------------------------------------------
# 1. Logits parity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny_dirs, targets, name):
  target = targets(name)
  ref = hf_tiny.reference_logits(tiny_dirs[name], PROMPTS)
  got = np.asarray(target.logits(right_pad(PROMPTS)))
  assert got.shape == (len(PROMPTS), max(map(len, PROMPTS)), target.config.vocab_size)
  for i, (prompt, want) in enumerate(zip(PROMPTS, ref)):
    err = np.abs(got[i, :len(prompt)] - want).max()
    assert err < LOGIT_TOL, f"{name}: prompt {i} (len {len(prompt)}) max|dlogit| {err:.3g}"


def test_gemma3_attention_softcap_is_not_applied(tiny_dirs):
  # transformers reads Gemma 3's attn_logit_softcapping (3.0 in the fixture) but never applies
  # it; ours must not either (the parity test above is what fails if it does: ~0.6 off).
  hf_cfg = json.loads((tiny_dirs["gemma3"] / "config.json").read_text())
  assert hf_cfg["attn_logit_softcapping"] == 3.0
  assert ModelConfig.from_hf_config(hf_cfg).attn_logit_softcap is None
  # Gemma 4 has no attention soft-cap at all (its config class has no such field).
  for name in ("gemma4_e", "gemma4_keqv", "gemma4_mix", "gemma4_e_mm"):
    hf_cfg = json.loads((tiny_dirs[name] / "config.json").read_text())
    assert "attn_logit_softcapping" not in hf_cfg.get("text_config", hf_cfg)
    assert ModelConfig.from_hf_config(hf_cfg).attn_logit_softcap is None


# ---------------------------------------------------------------------------------------------
# 2. KV cache: ragged prefill, decode, verify, rollback == full-sequence forward
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, params, tokens, lengths, cache):
  b = tokens.shape[0]
  batch = Batch(tokens=tokens, lengths=lengths, max_new=jnp.ones((b,), jnp.int32),
                stop_tokens=jnp.full((b, 1), -1, jnp.int32),
                request_ids=jnp.arange(b, dtype=jnp.int32))
  cache, logits, _ = loop.prefill(nnx.merge(graphdef, params), batch, cache)
  return cache, logits


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _cached_step(graphdef, params, tokens, positions, cache):
  """T tokens per row at each row's own offset (decode: T = 1, verify: T > 1)."""
  out = nnx.merge(graphdef, params)(tokens, positions, cache=cache)
  return out.logits, out.cache


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gemma4_e", "gemma4_mix"])
def test_cache_matches_full_forward(targets, name):
  """Prefill a ragged batch, decode token by token, verify blocks, roll back: every logit equals
  the full-sequence forward's at the same position.

  gemma3 / gemma4_*: sliding windows of 4 are crossed many times over; gemma4_e: KV-shared
  layers read non-adjacent source layers' cache entries; gemma4_mix: K=V layers that are also
  shared, PLE.
  """
  target = targets(name)
  cfg = target.config
  rng = np.random.default_rng(0)
  length, capacity = 20, 24
  seqs = rng.integers(3, 250, size=(3, length)).astype(np.int32)
  full = np.asarray(target.logits(seqs))  # the definition; parity with transformers is test 1
  graphdef, params = target.graphdef, target.params
  tol = CACHE_TOL_BY_MODEL.get(name, CACHE_TOL)

  def check(logits, rows_pos, what):
    """logits [B, T, V] of the tokens at positions rows_pos [B, T] (-1: don't compare)."""
    for b in range(len(seqs)):
      for t, p in enumerate(rows_pos[b]):
        if p >= 0:
          err = np.abs(np.asarray(logits[b, t]) - full[b, p]).max()
          assert err < tol, f"{name} {what}: row {b} position {p}: max|dlogit| {err:.3g}"

  # Ragged prefill: rows of 7, 3 and 1 tokens, right-padded (the pad K/V land in the cache
  # beyond each row's length: stale slots that later writes must overwrite).
  lengths = np.array([7, 3, 1], np.int32)
  prompt = right_pad([list(s[:n]) for s, n in zip(seqs, lengths)])
  cache = KVCache.init(cfg, len(seqs), capacity, target.dtype)
  cache, last = _prefill(graphdef, params, jnp.asarray(prompt), jnp.asarray(lengths), cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
  check(np.asarray(last)[:, None], (lengths - 1)[:, None], "prefill")

  # Token-by-token decode, each row at its own offset.
  for step in range(3):
    pos = lengths[:, None]
    tok = np.take_along_axis(seqs, pos, axis=1)
    logits, cache = _cached_step(graphdef, params, jnp.asarray(tok), jnp.asarray(pos), cache)
    check(logits, pos, f"decode step {step}")
    lengths = lengths + 1
    cache = cache.commit(jnp.asarray(lengths))

  # Verify a 5-token block whose tail is wrong (rejected draft tokens), accept a different
  # prefix per row (0 = reject all) and commit only that: the garbage K/V stay in the cache.
  t_block = 5
  accept = np.array([1, 3, 0], np.int32)
  pos = lengths[:, None] + np.arange(t_block)[None, :]
  block = np.take_along_axis(seqs, pos, axis=1).copy()
  wrong = np.arange(t_block)[None, :] >= accept[:, None]
  shift = rng.integers(1, 247, size=int(wrong.sum()))  # ids stay in [3, 250), never equal
  block[wrong] = 3 + (block[wrong] - 3 + shift) % 247
  assert (block != np.take_along_axis(seqs, pos, axis=1))[wrong].all()
  logits, cache = _cached_step(graphdef, params, jnp.asarray(block), jnp.asarray(pos), cache)
  check(logits, np.where(wrong, -1, pos), "verify (accepted prefix)")
  lengths = lengths + accept
  cache = cache.commit(jnp.asarray(lengths))

  # Verify the true continuation (3 tokens < the 5 written): it overwrites part of the rejected
  # block; the rest is beyond every query and must stay invisible.
  pos = lengths[:, None] + np.arange(3)[None, :]
  block = np.take_along_axis(seqs, pos, axis=1)
  logits, cache = _cached_step(graphdef, params, jnp.asarray(block), jnp.asarray(pos), cache)
  check(logits, pos, "verify after rollback")
  assert pos.max() < length and (lengths + t_block).max() <= capacity


# ---------------------------------------------------------------------------------------------
# 3. Taps (hidden states of chosen layers)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3", "llama_bias", "gemma3", "gemma4_e", "gemma4_mix",
                                  "gemma4_e_mm"])
def test_taps_match_transformers_hidden_states(tiny_dirs, targets, name):
  """Our tap of layer i is layer i's raw output (the residual stream after the layer, before the
  final norm), which is transformers' `output_hidden_states[i + 1]` for every layer but the
  last; transformers' last entry `hidden_states[n]` is the final-normed state, which is our
  `ForwardOutput.hidden`. The last layer's raw output is checked against a forward hook.
  """
  target = targets(name)
  n, d = target.config.num_layers, target.config.hidden_size
  taps = tuple(range(n))
  out = target.forward(right_pad(PROMPTS), taps=taps)
  got_taps = np.asarray(out.taps)
  assert got_taps.shape == (len(PROMPTS), max(map(len, PROMPTS)), n * d)
  # Exact values come from transformers in float64. Over Gemma 4's residual stream (|h| ~ 20
  # by layer 5) float32 rounding alone puts transformers' own float32 states up to ~1e-4 from
  # them, so the bound is 1e-4 or twice transformers' own float32 error, whichever is larger.
  model32 = hf_tiny._load(tiny_dirs[name], cache=False)
  model64 = hf_tiny._load(tiny_dirs[name], cache=False).double()
  for r, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      hs = model64(torch.tensor([prompt]), output_hidden_states=True,
                   use_cache=False).hidden_states
      hs32 = model32(torch.tensor([prompt]), output_hidden_states=True,
                     use_cache=False).hidden_states
    hooked = hf_tiny.reference_hidden_states(tiny_dirs[name], prompt, [n - 1], model64)[n - 1]
    hooked32 = hf_tiny.reference_hidden_states(tiny_dirs[name], prompt, [n - 1], model32)[n - 1]
    assert len(hs) == n + 1
    valid = slice(0, len(prompt))
    for i in taps:
      want = hs[i + 1][0].numpy() if i < n - 1 else hooked
      theirs = hs32[i + 1][0].numpy() if i < n - 1 else hooked32
      tol = max(LOGIT_TOL, 2 * np.abs(theirs - want).max())
      ours = got_taps[r, valid, i * d:(i + 1) * d]
      err = np.abs(ours - want).max()
      assert err < tol, f"{name}: prompt {r} layer {i}: max|dh| {err:.3g} (bound {tol:.3g})"
    # The final-normed state has the same float32 floor as the taps (CI CPUs land either side
    # of 1e-4 for Gemma 4): the same bound, from transformers' own float32 error.
    tol = max(LOGIT_TOL, 2 * np.abs(hs32[n][0].numpy() - hs[n][0].numpy()).max())
    err = np.abs(np.asarray(out.hidden)[r, valid] - hs[n][0].numpy()).max()
    assert err < tol, (f"{name}: prompt {r} final-normed hidden: max|dh| {err:.3g} "
                       f"(bound {tol:.3g})")


def test_taps_keep_the_requested_order(targets):
  target = targets("llama")
  ids = right_pad(PROMPTS[2:])
  both = np.asarray(target.forward(ids, taps=(2, 0)).taps)
  every = np.asarray(target.forward(ids, taps=(0, 1, 2)).taps)
  d = target.config.hidden_size
  np.testing.assert_array_equal(both[..., :d], every[..., 2 * d:])
  np.testing.assert_array_equal(both[..., d:], every[..., :d])
  assert target.forward(ids).taps is None


# ---------------------------------------------------------------------------------------------
# 4. Full-size shapes: parameter names, sizes and count == transformers (meta device)
# ---------------------------------------------------------------------------------------------


def _qwen3(hidden, layers, heads, kv_heads, inter, tied):
  # As in the released config.json files (legacy rope_theta / rope_scaling spelling).
  return dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
              hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=128, intermediate_size=inter,
              hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000, rope_scaling=None,
              attention_bias=False, max_position_embeddings=40960, use_sliding_window=False,
              tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645)


def _gemma4(**kw):
  base = dict(model_type="gemma4_text", architectures=["Gemma4ForCausalLM"], vocab_size=262144,
              head_dim=256, global_head_dim=512, hidden_activation="gelu_pytorch_tanh",
              rms_norm_eps=1e-6, sliding_window=1024, final_logit_softcapping=30.0,
              max_position_embeddings=131072, tie_word_embeddings=True, enable_moe_block=False,
              rope_parameters={
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                  "full_attention": {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                                     "partial_rotary_factor": 0.25}})
  return {**base, **kw}


_S, _F = "sliding_attention", "full_attention"
FULL_SIZE = {
    # (HF config dict, published total parameter count in billions, to 0.1B)
    "Qwen3-4B": (_qwen3(2560, 36, 32, 8, 9728, tied=True), 4.0),
    "Qwen3-8B": (_qwen3(4096, 36, 32, 8, 12288, tied=False), 8.2),
    "Qwen3-14B": (_qwen3(5120, 40, 40, 8, 17408, tied=False), 14.8),
    # Gemma 4 geometries in the style of the dense releases (not claimed to be their exact
    # configs): a large K=V model with fewer, wider global kv heads, and an "E" model with
    # per-layer embeddings, a KV-shared tail and double-wide MLPs there.
    "gemma4-dense-keqv": (_gemma4(
        hidden_size=5376, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
        intermediate_size=21504, attention_k_eq_v=True, num_global_key_value_heads=4,
        hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        layer_types=([_S] * 5 + [_F]) * 10), None),
    "gemma4-e": (_gemma4(
        hidden_size=1536, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
        intermediate_size=6144, attention_k_eq_v=False, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144, num_kv_shared_layers=20, use_double_wide_mlp=True,
        sliding_window=512, layer_types=([_S] * 4 + [_F]) * 7), None),
}


def _hf_meta_model(hf_dict):
  kw = {k: v for k, v in hf_dict.items() if k not in ("model_type", "architectures")}
  cfg = transformers.AutoConfig.for_model(hf_dict["model_type"], **kw)
  with torch.device("meta"):
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameters_match_transformers(name):
  hf_dict, published_b = FULL_SIZE[name]
  cfg = ModelConfig.from_hf_config(hf_dict)
  model = _hf_meta_model(hf_dict)
  want_count = sum(p.numel() for p in model.parameters())  # tied weights once
  assert transformer.count_params(cfg) == want_count
  if published_b is not None:
    assert round(want_count / 1e9, 1) == published_b, want_count
  # Name by name: every checkpoint tensor transformers saves (params and persistent buffers,
  # Gemma 4's layer_scalar) is one of ours with the same number of elements.
  want = {k: v.numel() for k, v in model.state_dict().items()}
  if cfg.tie_word_embeddings:
    want.pop("lm_head.weight")
  _, state = nnx.split(transformer.abstract_model(cfg))
  ours = {hf_ckpt.hf_key(p): int(np.prod(v.get_value().shape))
          for p, v in nnx.to_flat_state(state)}
  assert sorted(set(ours) - set(want)) == [] and sorted(set(want) - set(ours)) == []
  assert {k: v for k, v in ours.items() if want[k] != v} == {}
  # transformers' saved config.json (native per_layer_config spelling for Gemma 4) gives the
  # same architecture as the hand-written dict (token ids aside: transformers fills defaults).
  ids = dict(bos_token_id=None, eos_token_ids=(), pad_token_id=None)
  saved = ModelConfig.from_hf_config(model.config.to_dict())
  assert dataclasses.replace(saved, **ids) == dataclasses.replace(cfg, **ids)


# ---------------------------------------------------------------------------------------------
# 5. Bad input
# ---------------------------------------------------------------------------------------------


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_tensors(model_dir, fn):
  path = model_dir / "model.safetensors"
  tensors = safetensors.numpy.load_file(path)
  fn(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(model_dir, fn):
  path = model_dir / "config.json"
  cfg = json.loads(path.read_text())
  fn(cfg)
  path.write_text(json.dumps(cfg))


def test_missing_and_unexpected_tensors_are_named(tiny_dirs, tmp_path):
  d = _copy(tiny_dirs["qwen3"], tmp_path / "missing")
  _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(dspark_jax.CheckpointMismatchError,
                     match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
    dspark_jax.load_target(d)

  d = _copy(tiny_dirs["qwen3"], tmp_path / "extra")
  _edit_tensors(d, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight":
                                       np.ones((4, 4), np.float32)}))
  with pytest.raises(dspark_jax.CheckpointMismatchError,
                     match=r"unexpected tensors \(1\): model\.layers\.0\.mlp\.extra_proj\.weight"):
    dspark_jax.load_target(d)

  # Both at once: one error lists both.
  d = _copy(tiny_dirs["gemma4_e"], tmp_path / "both")
  _edit_tensors(d, lambda t: (t.pop("model.layers.2.self_attn.q_norm.weight"),
                              t.update({"model.bogus": np.zeros(3, np.float32)})))
  with pytest.raises(dspark_jax.CheckpointMismatchError) as e:
    dspark_jax.load_target(d)
  assert "model.layers.2.self_attn.q_norm.weight" in str(e.value)
  assert "model.bogus" in str(e.value)


def test_wrong_shape_is_named(tiny_dirs, tmp_path):
  d = _copy(tiny_dirs["llama"], tmp_path / "shape")
  _edit_tensors(d, lambda t: t.update({"model.layers.0.mlp.down_proj.weight":
                                       np.zeros((64, 100), np.float32)}))
  with pytest.raises(dspark_jax.CheckpointMismatchError,
                     match=r"model\.layers\.0\.mlp\.down_proj\.weight: checkpoint shape "
                           r"\(64, 100\) does not fit model shape"):
    dspark_jax.load_target(d)


def test_unsupported_architecture(tiny_dirs, tmp_path):
  d = _copy(tiny_dirs["llama"], tmp_path / "mixtral")
  _edit_config(d, lambda c: c.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                                     num_local_experts=4, num_experts_per_tok=2))
  with pytest.raises(UnsupportedModelError,
                     match=r"unsupported architecture: model_type='mixtral' "
                           r"architectures=\['MixtralForCausalLM'\].*supports model_type in"):
    dspark_jax.load_target(d)
  assert issubclass(UnsupportedModelError, NotImplementedError)


@pytest.mark.parametrize("name", ["gemma4_keqv", "gemma4_e_mm"])
def test_gemma4_moe_is_not_implemented(tiny_dirs, tmp_path, name):
  def moe(c):
    text = c.get("text_config", c)  # gemma4_e_mm: the multimodal wrapper, as released
    text.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
  d = _copy(tiny_dirs[name], tmp_path / name)
  _edit_config(d, moe)
  with pytest.raises(NotImplementedError, match=r"Gemma 4 MoE \(enable_moe_block=True\)"):
    dspark_jax.load_target(d)


# (tiny model, config edit, error message) for settings transformers honours and we cannot.
UNSUPPORTED_SETTINGS = {
    "qwen3 sliding window": ("qwen3", {"use_sliding_window": True, "sliding_window": 8},
                             r"use_sliding_window=True is not supported"),
    "llama dynamic rope": ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                         "rope_theta": 1e4}},
                           r"rope_type 'dynamic' is not supported"),
    "legacy longrope": ("llama", {"rope_parameters": None, "rope_theta": 1e4,
                                  "rope_scaling": {"type": "longrope", "factor": 2.0}},
                        r"rope_type 'longrope' is not supported"),
    "llama sliding layers": ("llama", {"layer_types": [hf_tiny.S, hf_tiny.F, hf_tiny.F]},
                             r"llama: only full_attention layers are supported"),
    "chunked attention": ("gemma3", {"layer_types": [hf_tiny.S, "chunked_attention",
                                                     hf_tiny.S, hf_tiny.F]},
                          r"layer type 'chunked_attention' is not supported"),
    "gemma3 bidirectional": ("gemma3", {"use_bidirectional_attention": True},
                             r"Gemma 3 use_bidirectional_attention is not supported"),
    "gemma4 bidirectional": ("gemma4_keqv", {"use_bidirectional_attention": "all"},
                             r"Gemma 4 use_bidirectional_attention is not supported"),
    "activation": ("llama", {"hidden_act": "relu"}, r"activation 'relu' is not supported"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_SETTINGS))
def test_unsupported_settings_are_refused(tiny_dirs, case):
  name, edit, message = UNSUPPORTED_SETTINGS[case]
  hf_cfg = json.loads((tiny_dirs[name] / "config.json").read_text())
  ModelConfig.from_hf_config(hf_cfg)  # the unedited config is fine
  with pytest.raises(UnsupportedModelError, match=message):
    ModelConfig.from_hf_config({**hf_cfg, **edit})


# ---------------------------------------------------------------------------------------------
# 6. A real model (slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers():
  """The embedded demo model (SmolLM2-135M-Instruct, converted from its GGUF into float32
  safetensors): one ragged batch of greedy continuations equals transformers' generate."""
  try:
    path = dspark_jax.target.resolve_model_path("smollm2-135m-instruct")
  except demo.DemoModelNotInstalledError as e:
    pytest.skip(f"demo model weights not installed: {e}")
  target = dspark_jax.load_target(path, dtype="float32")
  texts = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea, there lived"]
  prompts = [target.tokenizer.encode(t) for t in texts]
  assert len({len(p) for p in prompts}) == len(prompts)  # a ragged batch
  result = dspark_jax.generate(target, prompts, max_new_tokens=16, temperature=0.0,
                               stop_tokens=[])
  for text, prompt, got in zip(texts, prompts, result.tokens):
    want = hf_tiny.reference_greedy(path, prompt, 16)
    assert got == want, (f"{text!r}: ours {target.tokenizer.decode(got)!r} vs transformers "
                         f"{target.tokenizer.decode(want)!r}")
  # The logits along the way, too. Relative to the logit scale: this model's logits reach ~35
  # (the tiny models' ~7), and 30 float32 layers put ours 0.7-1.3e-4 from transformers' (measured
  # on these prompts: 2-5e-6 of max|logit|); a real divergence is orders of magnitude larger.
  seqs = [p + t for p, t in zip(prompts, result.tokens)]
  ours = np.asarray(target.logits(right_pad(seqs, pad=0)))
  for i, (seq, want) in enumerate(zip(seqs, hf_tiny.reference_logits(path, seqs))):
    err = np.abs(ours[i, :len(seq)] - want).max()
    assert err < 1e-5 * np.abs(want).max(), (
        f"prompt {i}: max|dlogit| {err:.3g}, max|logit| {np.abs(want).max():.3g}")
