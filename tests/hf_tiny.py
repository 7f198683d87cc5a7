"""Tiny random Hugging Face checkpoints that switch on every architecture feature we implement.

The logit-parity tests load these directories with our own loader and compare against
transformers. A parity test is only as good as its fixture: a feature that is off, or whose
weights are at their trivial init (RMSNorm weights of ones, Gemma's zero `(1 + w)` weights,
`layer_scalar` of 1), cannot make a test fail. So every config here turns its family's switches
on at sizes where they change the numbers (sequences longer than the sliding window, llama3 RoPE
wavelengths that straddle the scaling thresholds, ...), and `build` re-draws *every* parameter
and persistent buffer with moderate magnitudes (logits O(1-10), attention neither uniform nor
one-hot). `python tests/hf_tiny.py` prints, for each config, how much the logits move when each
feature is switched off: at least 10x the 1e-4 parity tolerance (`VISIBLE`), most by 1-10. One
switch is deliberately invisible: transformers ignores Gemma 3's `attn_logit_softcapping`.

float32 noise: transformers itself differs from a float64 run of the same weights by up to ~5e-5
on these logits (deepest Gemma 4 stack), so 1e-4 is about 2x the noise floor there; the weight
scales below were chosen to keep it that low (see `randomise_`).

Everything is built offline from configs (no hub) with torch on CPU in float32 and eager
attention. torch is imported lazily so this module imports without it (the tests skip then).

Reference helpers (`reference_logits`, `reference_hidden_states`, `reference_greedy`) run
transformers on one unpadded prompt at a time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import transformers

S, F = "sliding_attention", "full_attention"

# Prompts the parity tests can share: 1 token, shorter than every sliding window, and longer
# than every window (the windows here are 4-5), all with ids < 256 (the smallest vocab).
PROMPTS: list[list[int]] = [
    [17],
    [5, 200, 31, 77],
    [3, 141, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33],
    [250, 9, 9, 9, 100, 42, 7, 7, 199, 18, 28, 182, 84, 59, 4, 45, 23, 5, 36],
]


@dataclasses.dataclass(frozen=True)
class Toggle:
  """One feature switched off, to show that it moves the logits.

  Attributes:
    name: what is switched off.
    config: keyword overrides for the config (a shape change re-draws the affected weights).
    edit: optional in-place edit of the variant's state dict (e.g. zero a table), run after the
      base weights were copied in.
    patch: optional in-place edit of the variant *module* (after its weights are loaded), for
      what no config switch reaches: a scale constant, which layer stores the shared KV.
    visible: whether transformers is expected to react at all. False marks a switch that
      transformers reads into the config but never applies (the fixture keeps it set so that a
      reimplementation that *does* apply it fails parity).
  """

  name: str
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  edit: Callable[[dict], None] | None = None
  patch: Callable[[Any], None] | None = None
  visible: bool = True


@dataclasses.dataclass(frozen=True)
class Spec:
  """A named tiny model.

  Attributes:
    config_cls: name of the transformers config class.
    model_cls: name of the transformers `*ForCausalLM` class.
    kwargs: config keyword arguments.
    covers: one line on what the config exercises.
    hub_format: Gemma 4 only. transformers 5.23 serialises full-attention geometry as
      `per_layer_config` ({layer: {head_dim, num_key_value_heads}}); the released checkpoints
      carry `global_head_dim` / `num_global_key_value_heads` instead. With True, config.json is
      rewritten into the released form (and the reload is checked), so the loader sees both.
    toggles: feature switches for `feature_deltas`.
    wrapper: (config class, model class) of a multimodal wrapper with no vision/audio tower, as
      the released Gemma 4 checkpoints are saved (model_type "gemma4", `text_config`, weights
      under `model.language_model.`). The text config is then `kwargs` as usual.
  """

  config_cls: str
  model_cls: str
  kwargs: dict[str, Any]
  covers: str
  hub_format: bool = False
  toggles: tuple[Toggle, ...] = ()
  wrapper: tuple[str, str] | None = None

  def make_config(self, **overrides) -> transformers.PretrainedConfig:
    kw = {"dtype": "float32", "attn_implementation": "eager", **self.kwargs, **overrides}
    text = getattr(transformers, self.config_cls)(**_deepcopy(kw))
    if self.wrapper is None:
      return text
    return getattr(transformers, self.wrapper[0])(
        text_config=text.to_dict(), vision_config=None, audio_config=None, dtype="float32",
        tie_word_embeddings=text.tie_word_embeddings, attn_implementation="eager")


def _deepcopy(x):
  return json.loads(json.dumps(x))


def _torch():
  """Imports torch, pinned to one intra-op thread.

  These models are a few hundred kFLOPs per token: with 2+ threads on a shared 2-core box the
  OpenMP hand-off dominates (measured ~300 ms vs ~15 ms per forward).
  """
  import torch
  if torch.get_num_threads() != 1:
    torch.set_num_threads(1)
  return torch


def _set(key: str, value: float) -> Callable[[dict], None]:
  """A state-dict edit that fills every tensor whose name contains `key` with `value`."""
  def edit(sd):
    hit = [k for k in sd if key in k]
    assert hit, key
    for k in hit:
      sd[k].fill_(value)
  return edit


def _each_attn(fn) -> Callable[[Any], None]:
  """A module patch that calls fn(attention module) on every decoder layer."""
  def patch(model):
    for layer in _text_model(model).layers:
      fn(layer.self_attn)
  return patch


def _fill_buffer(path: str, value: float) -> Callable[[Any], None]:
  def patch(model):
    model.get_submodule(path.rsplit(".", 1)[0]).get_buffer(path.rsplit(".", 1)[1]).fill_(value)
  return patch


def _first_of_type_stores(model):
  """KV-shared layers read the *first* non-shared layer of their type instead of the last."""
  modes = model.config.get_text_config().kv_sharing_modes
  types = model.config.get_text_config().layer_types
  for kind in set(types):
    idx = [i for i in range(len(types)) if types[i] == kind and modes[i] != "reuse"]
    for i in idx:
      _text_model(model).layers[i].self_attn.store_full_length_kv = i == idx[0]


def _rope(theta: float, rope_type: str = "default", **extra) -> dict[str, Any]:
  return {"rope_type": rope_type, "rope_theta": theta, **extra}


_COMMON = dict(max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.02,
               use_cache=True)

_QWEN3 = dict(
    _COMMON, vocab_size=320, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2,
    head_dim=16,  # != hidden/heads (as in Qwen3-0.6B: 16 heads x 128 on hidden 1024)
    rope_parameters=_rope(1_000_000.0), tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, pad_token_id=0)

# llama3 RoPE at head_dim 16, theta 5e5: wavelengths 6.3, 33, 170, ... With
# original_max_position_embeddings=64 and low/high factors 1/4 the thresholds are 64 and 16, so
# the first frequency is kept, the second is smoothed and the rest are divided by `factor`.
_LLAMA3_ROPE = _rope(500_000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)
_LLAMA = dict(
    _COMMON, vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", rope_parameters=_LLAMA3_ROPE,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA_BIAS = dict(
    _LLAMA, vocab_size=300, num_hidden_layers=2, head_dim=24,  # 4 x 24 != 64: o_proj is not square
    attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
    rope_parameters=_rope(20_000.0), num_key_value_heads=1)

_GEMMA3 = dict(
    _COMMON, vocab_size=288, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    query_pre_attn_scalar=24,  # scaling 24**-0.5, not head_dim**-0.5
    hidden_activation="gelu_pytorch_tanh",
    layer_types=[S, F, S, S],  # last layer sliding: nothing may assume it is full
    sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=8.0,
    rope_parameters={S: _rope(10_000.0), F: _rope(1_000_000.0, "linear", factor=4.0)},
    tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)

# Gemma 4 "E" style (E2B/E4B): per-layer embeddings, KV-shared tail with double-wide MLP,
# separate full-attention head_dim, no k_eq_v. Layers [S F S S | F S F], 3 shared: the shared
# layers read the *last* non-shared layer of their type (sliding -> 3, full -> 1), so neither
# "previous layer" nor "first layer of the type" picks the right source.
_GEMMA4_E = dict(
    _COMMON, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
    # Ignored by transformers because attention_k_eq_v is False (full layers keep 2 kv heads):
    # a loader that applies it anyway fails parity.
    num_global_key_value_heads=1, attention_k_eq_v=False,
    hidden_activation="gelu_pytorch_tanh", layer_types=[S, F, S, S, F, S, F], sliding_window=4,
    rope_parameters={S: _rope(1_000.0),
                     F: _rope(50_000.0, "proportional", partial_rotary_factor=0.25)},
    # PLE width: the PLE branch ends in an RMSNorm of gelu(gate(h)) * ple, which is ~0 when
    # every gate is negative; at width 4 that happens at some position and the norm blows float32
    # rounding past 1e-4 (measured 4e-4). At 16 (real models: 256) it practically never does.
    hidden_size_per_layer_input=16, vocab_size_per_layer_input=256,
    num_kv_shared_layers=3, use_double_wide_mlp=True, final_logit_softcapping=8.0,
    enable_moe_block=False, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
    pad_token_id=0)

# Gemma 4 dense "31B" style: k_eq_v full layers with their own kv-head count and head_dim,
# proportional RoPE at 1/2, no PLE, no KV sharing.
_GEMMA4_KEQV = dict(
    _COMMON, vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, global_head_dim=24,
    num_global_key_value_heads=1, attention_k_eq_v=True, hidden_activation="gelu_pytorch_tanh",
    layer_types=[S, S, F, F], sliding_window=5,
    rope_parameters={S: _rope(5_000.0),
                     F: _rope(200_000.0, "proportional", partial_rotary_factor=0.5)},
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=320, num_kv_shared_layers=0,
    final_logit_softcapping=10.0, enable_moe_block=False, tie_word_embeddings=True,
    bos_token_id=2, eos_token_id=1, pad_token_id=0)

# Everything at once, in combinations no released model uses but the code paths allow:
# k_eq_v full layers that are also KV-shared (layers 3 and 4 both read layer 0's K=V), PLE,
# attention biases, a proportional-RoPE `factor` (applied, though the rope validator warns it is
# an unrecognised key), untied head, full layers with *more* kv heads than sliding ones.
_GEMMA4_MIX = dict(
    _COMMON, vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=1, head_dim=8, global_head_dim=16,
    num_global_key_value_heads=2, attention_k_eq_v=True, attention_bias=True,
    hidden_activation="gelu_pytorch_tanh", layer_types=[F, S, S, F, F], sliding_window=4,
    rope_parameters={S: _rope(2_000.0),
                     F: _rope(100_000.0, "proportional", partial_rotary_factor=0.5, factor=2.0)},
    hidden_size_per_layer_input=16, vocab_size_per_layer_input=256,
    num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=6.0,
    enable_moe_block=False, tie_word_embeddings=False, bos_token_id=2, eos_token_id=1,
    pad_token_id=0)


def _all_full(n):
  return {"layer_types": [F] * n}


SPECS: dict[str, Spec] = {
    "qwen3": Spec(
        "Qwen3Config", "Qwen3ForCausalLM", _QWEN3,
        "GQA 4q/2kv, head_dim 16 != hidden/heads, q/k RMSNorm, untied head, rope_theta 1e6",
        toggles=(
            Toggle("q_norm weights -> 1", edit=_set("q_norm", 1.0)),
            Toggle("k_norm weights -> 1", edit=_set("k_norm", 1.0)),
            Toggle("rope_theta 1e6 -> 1e4", {"rope_parameters": _rope(10_000.0)}),
            Toggle("untied -> tied head", {"tie_word_embeddings": True}),
        )),
    "llama": Spec(
        "LlamaConfig", "LlamaForCausalLM", _LLAMA,
        "GQA 4q/2kv, tied embeddings, llama3 RoPE (kept, smoothed and divided frequencies)",
        toggles=(
            Toggle("llama3 rope -> default", {"rope_parameters": _rope(500_000.0)}),
            Toggle("llama3 factor 8 -> 2", {"rope_parameters": {**_LLAMA3_ROPE, "factor": 2.0}}),
            Toggle("norm weights -> 1", edit=_set("layernorm", 1.0)),
        )),
    "llama_bias": Spec(
        "LlamaConfig", "LlamaForCausalLM", _LLAMA_BIAS,
        "attention_bias + mlp_bias, head_dim 24 (4x24 != hidden 64), MQA (1 kv head), untied",
        toggles=(
            Toggle("q/k/v/o biases -> 0",
                   edit=lambda sd: [sd[k].zero_() for k in sd if "self_attn" in k and "bias" in k]),
            Toggle("mlp biases -> 0",
                   edit=lambda sd: [sd[k].zero_() for k in sd if "mlp" in k and "bias" in k]),
        )),
    "gemma3": Spec(
        "Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA3,
        "sliding(4)/full layers, query_pre_attn_scalar 24 != head_dim 16, attn + final softcaps, "
        "local/global rope thetas, linear rope x4 on full layers, (1+w) norms, sqrt(H) embed scale",
        toggles=(
            Toggle("sliding window 4 -> 64", {"sliding_window": 64}),
            Toggle("all layers full", _all_full(4)),
            # Gemma3Attention stores attn_logit_softcapping but never passes it to the attention
            # function (transformers 5.23): the cap is a no-op, and must stay one for parity.
            Toggle("attn softcap -> off (ignored by HF)", {"attn_logit_softcapping": None},
                   visible=False),
            Toggle("final softcap -> off", {"final_logit_softcapping": None}),
            Toggle("query_pre_attn_scalar -> head_dim", {"query_pre_attn_scalar": 16}),
            Toggle("linear rope factor -> 1",
                   {"rope_parameters": {S: _rope(10_000.0), F: _rope(1_000_000.0)}}),
            Toggle("local theta -> global theta",
                   {"rope_parameters": {S: _rope(1_000_000.0),
                                        F: _rope(1_000_000.0, "linear", factor=4.0)}}),
            Toggle("(1+w) norm weights w -> 0", edit=_set("norm", 0.0)),
            Toggle("gelu tanh -> exact gelu", {"hidden_activation": "gelu"}),
            Toggle("embed sqrt(H) scale -> 1", patch=_fill_buffer("model.embed_tokens.embed_scale",
                                                                  1.0)),
        )),
    "gemma4_e": Spec(
        "Gemma4TextConfig", "Gemma4ForCausalLM", _GEMMA4_E,
        "E2B-style: PLE, 3 KV-shared layers (sources 3/1, not adjacent) with double-wide MLP, "
        "global_head_dim 16 vs 8, partial rope 0.25, final softcap, num_global_kv_heads ignored "
        "(k_eq_v False), hub-format config.json",
        hub_format=True,
        toggles=(
            Toggle("PLE off", {"hidden_size_per_layer_input": 0}),
            Toggle("PLE token table -> 0", edit=_set("embed_tokens_per_layer", 0.0)),
            Toggle("PLE context projection -> 0", edit=_set("per_layer_model_projection", 0.0)),
            Toggle("layer_scalar -> 1", edit=_set("layer_scalar", 1.0)),
            Toggle("KV sharing off", {"num_kv_shared_layers": 0}),
            Toggle("double-wide MLP off", {"use_double_wide_mlp": False}),
            Toggle("global_head_dim -> head_dim", {"global_head_dim": 8}),
            Toggle("partial rotary 0.25 -> 1.0",
                   {"rope_parameters": {S: _rope(1_000.0),
                                        F: _rope(50_000.0, "proportional",
                                                 partial_rotary_factor=1.0)}}),
            Toggle("sliding window 4 -> 64", {"sliding_window": 64}),
            Toggle("final softcap -> off", {"final_logit_softcapping": None}),
            Toggle("k_eq_v on (would use num_global_kv_heads)", {"attention_k_eq_v": True}),
            Toggle("shared KV from first layer of type", patch=_first_of_type_stores),
            # Not listed: PLE's 1/sqrt(2) combine scale and 1/sqrt(H) projection scale. Each sits
            # right before an RMSNorm (post_per_layer_input_norm, per_layer_projection_norm) and
            # cancels up to eps (measured max|dlogit| 1.6e-4 and 7.6e-5): parity cannot see them.
            Toggle("PLE table sqrt(d) scale -> 1",
                   patch=_fill_buffer("model.embed_tokens_per_layer.embed_scale", 1.0)),
            Toggle("embed sqrt(H) scale -> 1", patch=_fill_buffer("model.embed_tokens.embed_scale",
                                                                  1.0)),
        )),
    "gemma4_keqv": Spec(
        "Gemma4TextConfig", "Gemma4ForCausalLM", _GEMMA4_KEQV,
        "31B-style dense: attention_k_eq_v on full layers (1 kv head, head_dim 24) vs sliding "
        "(2 kv heads, head_dim 12), partial rope 0.5, sliding window 5, final softcap",
        toggles=(
            Toggle("k_eq_v off (separate v_proj)", {"attention_k_eq_v": False}),
            Toggle("global kv heads 1 -> 2", {"num_global_key_value_heads": 2}),
            Toggle("partial rotary 0.5 -> 0.25",
                   {"rope_parameters": {S: _rope(5_000.0),
                                        F: _rope(200_000.0, "proportional",
                                                 partial_rotary_factor=0.25)}}),
            Toggle("layer_scalar -> 1", edit=_set("layer_scalar", 1.0)),
            Toggle("q_norm weights -> 1", edit=_set("q_norm", 1.0)),
            Toggle("sliding window 5 -> 64", {"sliding_window": 64}),
            Toggle("attn scaling 1 -> head_dim^-0.5",
                   patch=_each_attn(lambda a: setattr(a, "scaling", a.head_dim ** -0.5))),
            Toggle("v_norm -> identity", patch=_each_attn(
                lambda a: setattr(a, "v_norm", __import__("torch").nn.Identity()))),
        )),
    "gemma4_mix": Spec(
        "Gemma4TextConfig", "Gemma4ForCausalLM", _GEMMA4_MIX,
        "k_eq_v + KV-shared full layers (3, 4 read 0) + PLE + attention biases + proportional "
        "rope factor 2 + untied head, full layers have more kv heads (2) than sliding (1), "
        "first layer full",
        hub_format=True,
        toggles=(
            Toggle("attention biases -> 0",
                   edit=lambda sd: [sd[k].zero_() for k in sd if k.endswith("bias")]),
            Toggle("rope factor 2 -> 1",
                   {"rope_parameters": {S: _rope(2_000.0),
                                        F: _rope(100_000.0, "proportional",
                                                 partial_rotary_factor=0.5)}}),
            Toggle("KV sharing off", {"num_kv_shared_layers": 0}),
            Toggle("PLE off", {"hidden_size_per_layer_input": 0}),
        )),
    "gemma4_e_mm": Spec(
        "Gemma4TextConfig", "Gemma4ForCausalLM", _GEMMA4_E,
        "gemma4_e saved as released checkpoints are: Gemma4ForConditionalGeneration with no "
        "vision/audio tower, model_type gemma4 + text_config (hub format), weights under "
        "model.language_model.*; same seed -> same weights and logits as gemma4_e",
        hub_format=True, wrapper=("Gemma4Config", "Gemma4ForConditionalGeneration")),
}

TINY_MODELS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    name: spec.make_config for name, spec in SPECS.items()}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _model_cls(spec: Spec):
  return getattr(transformers, spec.wrapper[1] if spec.wrapper else spec.model_cls)


def _text_model(model):
  """The decoder stack (`.layers`, `.norm`, `.embed_tokens`) of a causal LM or its wrapper."""
  inner = model.model
  return getattr(inner, "language_model", inner)


def _is_gemma_offset_norm(model) -> bool:
  # Gemma 3 RMSNorm computes x * (1 + w) with w zero-initialised; Gemma 4 and Llama/Qwen use x * w.
  return model.config.get_text_config().model_type.startswith("gemma3")


LOGIT_STD = 2.0


def randomise_(model, seed: int) -> None:
  """Re-draws every parameter and persistent buffer of `model` in place.

  Magnitudes are chosen so signals stay O(1) through the stack and logits have std ~2:
  matrices N(0, 1/fan_in), embedding N(0, 0.25/hidden), untied head N(0, 2.25/hidden), RMSNorm
  scales U(0.5, 1.5) except the final norm's (centred on 4/3 untied, 4 tied), biases N(0, 0.1^2),
  `layer_scalar` U(0.5, 1.5). Gemma 3 stores its norm scales as offsets w of (1 + w); Gemma 4's
  q/k norm scales are ~(2 / sqrt(head_dim))^0.5 since its attention scores are unscaled.

  Args:
    model: a transformers causal LM, float32, on CPU.
    seed: seeds a private generator (global torch RNG state is left alone).
  """
  torch = _torch()
  g = torch.Generator().manual_seed(seed)
  cfg = model.config.get_text_config()
  hidden = cfg.hidden_size
  offset_norm = _is_gemma_offset_norm(model)
  unscaled_attn = cfg.model_type.startswith("gemma4")
  # The embedding stays small next to what the layers add: with tied weights the input token's
  # own embedding in the final state gives it a logit ~sqrt(hidden) times the others', every
  # token predicts itself and greedy decoding is a string of repeats. A tied head then takes its
  # logit size from a large final-norm scale instead. Logit std ~2 (|logit| up to ~7): float32
  # rounding grows with the logits, and these stacks already reach ~3e-5 against float64.
  emb_std, head_std = 0.5 / hidden ** 0.5, 1.5 / hidden ** 0.5
  out_std = emb_std if cfg.tie_word_embeddings else head_std
  final_norm = LOGIT_STD / (out_std * hidden ** 0.5)
  seen = set()
  with torch.no_grad():
    # `named_parameters` drops the tied duplicate (lm_head.weight when tied).
    for name, p in sorted(model.named_parameters()):
      seen.add(name)
      if name.endswith(".bias"):
        p.normal_(0.0, 0.1, generator=g)
      elif p.ndim == 1:  # every 1-D weight here is an RMSNorm scale
        mid = final_norm if name.endswith("model.norm.weight") else 1.0  # (language_)model.norm
        if unscaled_attn and name.endswith(("q_norm.weight", "k_norm.weight")):
          # Gemma 4 does not scale q.k (scaling = 1): with unit norms the scores would have
          # std sqrt(head_dim), near one-hot softmaxes that amplify float32 rounding ~2x per
          # layer past the 1e-4 parity tolerance. Aim for score std ~2, as trained models do.
          mid = (2.0 / p.shape[0] ** 0.5) ** 0.5
          p.uniform_(0.75 * mid, 1.25 * mid, generator=g)
          continue
        p.uniform_(mid - 0.5 - offset_norm, mid + 0.5 - offset_norm, generator=g)
      elif name.endswith("embed_tokens.weight"):
        p.normal_(0.0, emb_std, generator=g)
      elif name == "lm_head.weight":
        p.normal_(0.0, head_std, generator=g)
      elif name.endswith("embed_tokens_per_layer.weight"):
        # Scaled by sqrt(ple_dim) in the forward: unit-size entries after the scale.
        p.normal_(0.0, cfg.hidden_size_per_layer_input ** -0.5, generator=g)
      elif p.ndim == 2:
        p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
      else:
        raise ValueError(f"no randomisation rule for {name} {tuple(p.shape)}")
    params = dict(model.named_parameters())
    for name, b in model.state_dict().items():
      if name in seen or name in params or name == "lm_head.weight":
        continue
      if name.endswith("layer_scalar"):
        b.uniform_(0.5, 1.5, generator=g)
      else:
        raise ValueError(f"persistent buffer {name} has no randomisation rule")


def _new_model(spec: Spec, seed: int, **overrides):
  model = _model_cls(spec)(spec.make_config(**overrides)).eval()
  randomise_(model, seed)
  return model


def _logits(model, prompt, **kwargs) -> np.ndarray:
  torch = _torch()
  with torch.no_grad():
    out = model(torch.tensor([prompt]), use_cache=False, **kwargs)
  return out.logits[0].float().numpy()


def _to_hub_format(cfg_path: pathlib.Path, spec: Spec) -> None:
  """Rewrites a Gemma 4 config.json the way released checkpoints spell full-layer geometry."""
  cfg = json.loads(cfg_path.read_text())
  text = cfg.get("text_config", cfg)
  text.pop("per_layer_config", None)
  text["global_head_dim"] = spec.kwargs["global_head_dim"]
  text["num_global_key_value_heads"] = spec.kwargs.get("num_global_key_value_heads")
  cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build(name: str, out_dir, *, seed: int = 0) -> pathlib.Path:
  """Builds tiny model `name`, randomises it, saves it and checks the reload.

  Args:
    name: a key of `TINY_MODELS`.
    out_dir: directory to write (created); gets config.json, generation_config.json and
      model.safetensors.
    seed: weight seed.

  Returns:
    `out_dir` as a Path.
  """
  import safetensors
  spec = SPECS[name]
  out = pathlib.Path(out_dir)
  model = _new_model(spec, seed)
  model.save_pretrained(out, safe_serialization=True)
  if spec.hub_format:
    _to_hub_format(out / "config.json", spec)

  # Persistent buffers (Gemma 4 `layer_scalar`) are part of the state dict, so save_pretrained
  # writes them; check, since a silently missing scalar would reload as ones.
  with safetensors.safe_open(out / "model.safetensors", "np") as f:
    saved = set(f.keys())
  expected = set(model.state_dict())
  if model.config.get_text_config().tie_word_embeddings:
    expected.discard("lm_head.weight")  # tied: only the embedding is stored
  assert saved == expected, (sorted(saved - expected), sorted(expected - saved))

  reloaded = _load(out, cache=False)
  for prompt in PROMPTS[2:]:
    a, b = _logits(model, prompt), _logits(reloaded, prompt)
    assert np.array_equal(a, b), f"{name}: reload changed logits by {np.abs(a - b).max()}"
  return out


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}


def _load(model_dir, *, cache: bool = True):
  """transformers model from `model_dir` (float32, eager), memoised on path + file mtimes."""
  torch = _torch()
  path = pathlib.Path(model_dir).resolve()
  key = (str(path), (path / "model.safetensors").stat().st_mtime_ns,
         (path / "config.json").stat().st_mtime_ns)
  if cache and key in _CACHE:
    return _CACHE[key]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  if cache:
    _CACHE.clear()  # one model at a time is plenty, and keeps memory flat across many dirs
    _CACHE[key] = model
  return model


def reference_logits(model_dir, prompts: list[list[int]]) -> list[np.ndarray]:
  """transformers logits for each prompt run alone (no padding, no cache).

  Returns:
    One float32 `[len(prompt), vocab]` array per prompt (every position).
  """
  model = _load(model_dir)
  return [_logits(model, list(p)) for p in prompts]


def reference_hidden_states(model_dir, prompt: list[int], layer_ids,
                            model=None) -> dict[int, np.ndarray]:
  """Raw decoder-layer outputs (the residual stream after layer i, before the final norm).

  Captured with forward hooks on the decoder layers (`model.model.layers[i]`), not with
  `output_hidden_states`: there `hidden_states[i + 1]` is layer i's output for every i but the
  last, whose entry transformers replaces with the *final-normed* state
  (`capture_outputs(tie_last_hidden_states=True)` in transformers/utils/output_capturing.py;
  `hidden_states[0]` is the scaled embedding). For Gemma 4 the hooked output is after PLE and
  `layer_scalar`, i.e. exactly what the next layer reads.

  Returns:
    {layer id: float32 `[len(prompt), hidden]`} for each requested id (negative ids count
    from the end, keys are the ids as given).
  """
  torch = _torch()
  model = model if model is not None else _load(model_dir)  # e.g. a float64 copy
  layers = _text_model(model).layers
  got, handles = {}, []
  for i in layer_ids:
    def hook(mod, args, out, i=i):
      got[i] = (out[0] if isinstance(out, tuple) else out)[0].float().numpy().copy()
    handles.append(layers[i].register_forward_hook(hook))
  try:
    with torch.no_grad():
      model(torch.tensor([list(prompt)]), use_cache=False)
  finally:
    for h in handles:
      h.remove()
  return got


def reference_greedy(model_dir, prompt: list[int], max_new_tokens: int, *,
                     stop_at_eos: bool = False) -> list[int]:
  """transformers `generate(do_sample=False)`: the new tokens for one prompt (KV cache on).

  Args:
    stop_at_eos: random tiny models hit EOS by chance; by default EOS is disabled so exactly
      `max_new_tokens` come back.
  """
  torch = _torch()
  model = _load(model_dir)
  pad = model.config.get_text_config().pad_token_id
  gen = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
             pad_token_id=0 if pad is None else pad)
  if not stop_at_eos:
    gen["eos_token_id"] = []
  with torch.no_grad():
    ids = torch.tensor([list(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
  return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------
# Feature visibility
# ---------------------------------------------------------------------------------------------


def feature_deltas(name: str, *, seed: int = 0, prompt=None) -> dict[str, float]:
  """max |logits(base) - logits(toggle)| over `prompt`, for each of the spec's toggles.

  The variant gets the base weights wherever names and shapes agree; whatever the toggle adds
  or reshapes is re-drawn (same seed), then the toggle's edit runs.
  """
  torch = _torch()
  spec = SPECS[name]
  prompt = PROMPTS[3] if prompt is None else prompt
  base = _new_model(spec, seed)
  ref = _logits(base, prompt)
  base_sd = base.state_dict()
  out = {}
  for t in spec.toggles:
    variant = _new_model(spec, seed, **t.config)
    sd = variant.state_dict()
    with torch.no_grad():
      for k, v in sd.items():
        if k in base_sd and base_sd[k].shape == v.shape:
          v.copy_(base_sd[k])
      if t.edit is not None:
        t.edit(sd)
      if t.patch is not None:
        t.patch(variant)
    # output_hidden_states=True only switches off Gemma 4's `_maybe_slice_kv_shared_inputs`
    # (a no-op slice here), which crashes on KV-shared models without PLE (the "PLE off" toggle).
    out[t.name] = float(np.abs(_logits(variant, prompt, output_hidden_states=True) - ref).max())
  return out


VISIBLE = 1e-3  # a switched-off feature must move some logit by 10x the 1e-4 parity tolerance


def check_toggles(name: str, deltas: dict[str, float]) -> list[str]:
  """Toggles whose effect disagrees with `Toggle.visible` (empty when all is as expected)."""
  bad = []
  for t in SPECS[name].toggles:
    d = deltas[t.name]
    if (d > VISIBLE) != t.visible or (not t.visible and d != 0.0):
      bad.append(f"{name}: {t.name}: max|dlogit| {d:.3g}")
  return bad


def num_params(model_dir) -> int:
  import safetensors
  with safetensors.safe_open(pathlib.Path(model_dir) / "model.safetensors", "np") as f:
    return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def main() -> int:
  _torch()
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  ok = True
  with tempfile.TemporaryDirectory() as tmp:
    t_all = time.perf_counter()
    for name, spec in SPECS.items():
      t0 = time.perf_counter()
      d = build(name, pathlib.Path(tmp) / name)
      t1 = time.perf_counter()
      logits = reference_logits(d, PROMPTS)
      t2 = time.perf_counter()
      lg = logits[3]
      p = np.exp(lg - lg.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      print(f"\n{name}: {num_params(d):,} params  build+save+reload {t1 - t0:.2f}s  "
            f"ref logits {t2 - t1:.2f}s  |logit| max {np.abs(lg).max():.2f} "
            f"std {lg.std():.2f}  top-p mean {p.max(-1).mean():.2f}")
      print(f"  covers: {spec.covers}")
      t3 = time.perf_counter()
      deltas = feature_deltas(name)
      bad = check_toggles(name, deltas)
      ok &= not bad
      for t in spec.toggles:
        flag = "BAD" if any(t.name in b for b in bad) else "ok "
        print(f"  [{flag}] {t.name:45s} max|dlogit| {deltas[t.name]:.3g}")
      print(f"  toggles {time.perf_counter() - t3:.2f}s")
    print(f"\nall configs built, saved, reloaded and toggled in {time.perf_counter() - t_all:.1f}s")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
