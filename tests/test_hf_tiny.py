"""Checks of the tiny HF fixtures themselves: they build, reload exactly, and every feature shows.

The parity tests trust these fixtures to fail on a missing feature; these tests keep that true
when transformers or the configs change.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import safetensors  # noqa: E402

import hf_tiny  # noqa: E402

NAMES = list(hf_tiny.TINY_MODELS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_tiny")
  return {name: hf_tiny.build(name, root / name) for name in NAMES}  # build() asserts the reload


def _tensors(model_dir):
  with safetensors.safe_open(model_dir / "model.safetensors", "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def _text_config(name):
  return hf_tiny.TINY_MODELS[name]().get_text_config()


def test_every_family_is_covered():
  types = {_text_config(n).model_type for n in NAMES}
  assert types == {"qwen3", "llama", "gemma3_text", "gemma4_text"}
  assert sum(n.startswith("gemma4") for n in NAMES) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_build_saves_nontrivial_weights(built, name):
  d = built[name]
  cfg = json.loads((d / "config.json").read_text())
  spec = hf_tiny.SPECS[name]
  assert cfg["architectures"] == [spec.wrapper[1] if spec.wrapper else spec.model_cls]
  assert cfg["dtype"] == "float32"
  cfg = cfg.get("text_config", cfg)
  tensors = _tensors(d)
  assert all(t.dtype == np.float32 for t in tensors.values())
  for k, t in tensors.items():
    # Nothing may sit at a trivial init: constant tensors (ones, zeros) hide whole code paths.
    assert t.size == 1 or np.unique(t).size > 1, k
  scalars = [k for k in tensors if k.endswith("layer_scalar")]
  if cfg["model_type"] == "gemma4_text":
    assert len(scalars) == cfg["num_hidden_layers"]
    assert all(abs(float(tensors[k][0]) - 1.0) > 1e-3 for k in scalars)
  else:
    assert not scalars


@pytest.mark.parametrize("name", [n for n in NAMES if hf_tiny.SPECS[n].hub_format])
def test_hub_format_config(built, name):
  cfg = json.loads((built[name] / "config.json").read_text())
  cfg = cfg.get("text_config", cfg)
  assert "per_layer_config" not in cfg
  assert cfg["global_head_dim"] == hf_tiny.SPECS[name].kwargs["global_head_dim"]
  assert "num_global_key_value_heads" in cfg


def test_native_format_config(built):
  cfg = json.loads((built["gemma4_keqv"] / "config.json").read_text())
  full = [i for i, t in enumerate(cfg["layer_types"]) if t == hf_tiny.F]
  assert cfg["per_layer_config"] == {
      str(i): {"head_dim": 24, "num_key_value_heads": 1} for i in full}


def test_gemma4_weights_absent_where_transformers_has_none(built):
  # gemma4_e: layers 4-6 are KV-shared (no k/v projections or k/v norms), no k_eq_v.
  t = _tensors(built["gemma4_e"])
  for i in range(7):
    has_kv = f"model.layers.{i}.self_attn.k_proj.weight" in t
    assert has_kv == (i < 4), i
    assert (f"model.layers.{i}.self_attn.v_proj.weight" in t) == (i < 4)
    assert f"model.layers.{i}.self_attn.q_norm.weight" in t  # shared layers keep q_norm
    width = t[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0]
    assert width == (128 if i >= 4 else 64), i  # double-wide MLP on shared layers only
  # Full layers: global_head_dim 16 and (k_eq_v off) the *sliding* kv-head count, 2.
  assert t["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 32)
  assert t["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
  # gemma4_keqv: full layers 2, 3 have k_proj (1 head x 24) and no v_proj.
  t = _tensors(built["gemma4_keqv"])
  for i, full in enumerate([False, False, True, True]):
    assert (f"model.layers.{i}.self_attn.v_proj.weight" in t) == (not full)
  assert t["model.layers.2.self_attn.k_proj.weight"].shape == (24, 48)
  # gemma4_mix: k_eq_v full layer 0 owns k_proj only; full layers 3, 4 are shared (no k/v).
  t = _tensors(built["gemma4_mix"])
  assert "model.layers.0.self_attn.k_proj.weight" in t
  assert "model.layers.0.self_attn.v_proj.weight" not in t
  assert "model.layers.1.self_attn.v_proj.weight" in t
  for i in (3, 4):
    assert not any(f"layers.{i}.self_attn.{w}" in k for k in t for w in ("k_", "v_"))


def test_gemma4_kv_sharing_sources():
  modes = hf_tiny.TINY_MODELS["gemma4_e"]().kv_sharing_modes
  assert modes == [None, "store", None, "store", "reuse", "reuse", "reuse"]
  modes = hf_tiny.TINY_MODELS["gemma4_mix"]().kv_sharing_modes
  assert modes == ["store", None, "store", "reuse", "reuse"]  # layers 3, 4 (full) read layer 0


def test_prompts_cross_every_sliding_window():
  configs = [_text_config(n) for n in NAMES]
  windows = [c.sliding_window for c in configs
             if "sliding_attention" in (getattr(c, "layer_types", None) or [])]
  assert windows and max(len(p) for p in hf_tiny.PROMPTS) > 3 * max(windows)
  assert max(max(p) for p in hf_tiny.PROMPTS) < min(c.vocab_size for c in configs)


def test_llama3_rope_changes_frequencies():
  # Some frequencies kept, some smoothed, some divided by `factor`: all three branches run.
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  cfg = hf_tiny.TINY_MODELS["llama"]()
  scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
  dim = cfg.hidden_size // cfg.num_attention_heads
  base = 1.0 / cfg.rope_parameters["rope_theta"] ** (np.arange(0, dim, 2) / dim)
  ratio = base / scaled.numpy()
  factor = cfg.rope_parameters["factor"]
  assert np.isclose(ratio, 1.0).any()
  assert np.isclose(ratio, factor).any()
  assert ((ratio > 1.01) & (ratio < factor - 0.01)).any()


def test_wrapped_gemma4_is_the_text_model(built):
  # Released Gemma 4 checkpoints are multimodal wrappers; the text path must be unchanged.
  assert all(k.startswith("model.language_model.") for k in _tensors(built["gemma4_e_mm"]))
  cfg = json.loads((built["gemma4_e_mm"] / "config.json").read_text())
  assert cfg["model_type"] == "gemma4" and cfg["text_config"]["model_type"] == "gemma4_text"
  assert cfg["vision_config"] is None and cfg["audio_config"] is None
  a = hf_tiny.reference_logits(built["gemma4_e"], hf_tiny.PROMPTS)
  b = hf_tiny.reference_logits(built["gemma4_e_mm"], hf_tiny.PROMPTS)
  for x, y in zip(a, b):
    # Same weights (same seed, same draw order); equal up to BLAS kernel choice (measured: bit-equal
    # except the 1-token prompt, 1 ulp at the first matmul growing to 7e-6 in the logits).
    np.testing.assert_allclose(x, y, atol=5e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if hf_tiny.SPECS[n].toggles])
def test_feature_switches_are_visible(name):
  deltas = hf_tiny.feature_deltas(name)
  assert set(deltas) == {t.name for t in hf_tiny.SPECS[name].toggles}
  assert not hf_tiny.check_toggles(name, deltas)


@pytest.mark.parametrize("name", NAMES)
def test_reference_logits(built, name):
  out = hf_tiny.reference_logits(built[name], hf_tiny.PROMPTS)
  vocab = _text_config(name).vocab_size
  for prompt, lg in zip(hf_tiny.PROMPTS, out):
    assert lg.shape == (len(prompt), vocab) and lg.dtype == np.float32
    assert np.isfinite(lg).all()
  last = out[-1]
  # O(1-10) and not flat: parity at 1e-4 on these numbers means something.
  assert 1.0 < last.std() < 6.0 and np.abs(last).max() < 30.0
  # A prefix's logits are the longer prompt's first rows (causal, no padding effects).
  short = hf_tiny.reference_logits(built[name], [hf_tiny.PROMPTS[-1][:5]])[0]
  # Not bit-exact: torch matmul blocking depends on the length (measured up to ~2e-5).
  np.testing.assert_allclose(short, last[:5], atol=5e-5)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gemma4_e", "gemma4_mix", "gemma4_e_mm"])
def test_reference_hidden_states(built, name):
  prompt = hf_tiny.PROMPTS[-1]
  model = hf_tiny._load(built[name])
  n = model.config.get_text_config().num_hidden_layers
  got = hf_tiny.reference_hidden_states(built[name], prompt, list(range(n)) + [-1])
  with torch.no_grad():
    out = model(torch.tensor([prompt]), output_hidden_states=True, use_cache=False)
  assert len(out.hidden_states) == n + 1
  for i in range(n - 1):
    np.testing.assert_array_equal(got[i], out.hidden_states[i + 1][0].numpy())
  np.testing.assert_array_equal(got[-1], got[n - 1])
  # transformers' last entry is the final-normed state, ours is the raw layer output.
  assert np.abs(got[n - 1] - out.hidden_states[n][0].numpy()).max() > 0.1
  with torch.no_grad():
    normed = hf_tiny._text_model(model).norm(torch.from_numpy(got[n - 1])).numpy()
  np.testing.assert_allclose(normed, out.hidden_states[n][0].numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "gemma4_e", "gemma4_keqv", "gemma4_mix",
                                  "gemma4_e_mm"])
def test_reference_greedy_matches_uncached_argmax(built, name):
  # generate() runs the KV cache (sliding caches, shared-KV layers); the uncached argmax loop
  # is the definition. Prompt + new tokens run well past every sliding window.
  prompt = hf_tiny.PROMPTS[2]
  got = hf_tiny.reference_greedy(built[name], prompt, 10)
  seq = list(prompt)
  for _ in range(10):
    seq.append(int(hf_tiny.reference_logits(built[name], [seq])[0][-1].argmax()))
  assert got == seq[len(prompt):]


def test_params_count(built):
  counts = {n: hf_tiny.num_params(built[n]) for n in NAMES}
  assert all(10_000 < c < 500_000 for c in counts.values()), counts
