"""Architecture configs: frozen, hashable dataclasses built from HF `config.json`.

One `ModelConfig` describes every supported target family (Llama, Qwen3,
Gemma 3 text, Gemma 4 text) through family switches; the decoder in
`models/transformer.py` reads only these fields, never the family name, except
through the derived properties below. Configs are hashable so they can be static
arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

FULL = "full_attention"
SLIDING = "sliding_attention"

SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "gemma3_text", "gemma3", "gemma4_text", "gemma4",
                         "gemma4_unified", "gemma4_unified_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "proportional", "yarn")


class UnsupportedModelError(NotImplementedError):
  """The checkpoint uses an architecture or feature dspark_jax does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters for one layer type (HF `rope_parameters`)."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  partial_rotary_factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedModelError(
          f"rope_type {self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if self.partial_rotary_factor != 1.0 and self.rope_type != "proportional":
      raise UnsupportedModelError(
          "partial_rotary_factor != 1 is only supported with rope_type 'proportional' (Gemma 4)")

  @classmethod
  def from_hf(cls, params: Mapping[str, Any] | None, default_theta: float = 10000.0) -> "RopeConfig":
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    kwargs = dict(theta=float(params.get("rope_theta", default_theta)), rope_type=rope_type)
    for key, field in (("factor", "factor"), ("partial_rotary_factor", "partial_rotary_factor"),
                       ("low_freq_factor", "low_freq_factor"),
                       ("high_freq_factor", "high_freq_factor"),
                       ("original_max_position_embeddings", "original_max_position_embeddings"),
                       ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                       ("attention_factor", "attention_factor"), ("truncate", "truncate")):
      if params.get(key) is not None:
        kwargs[field] = params[key]
    if rope_type in ("yarn", "linear", "llama3") and "factor" not in params:
      raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in rope_parameters")
    return cls(**kwargs)

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """Inverse frequencies `[H // 2]` (float32), matching transformers' rope init functions."""
    half = head_dim // 2
    base = self.theta
    if self.rope_type == "proportional":
      rope_angles = int(self.partial_rotary_factor * head_dim // 2)
      inv = 1.0 / (base ** (np.arange(0, 2 * rope_angles, 2, dtype=np.float32) / head_dim))
      inv = np.concatenate([inv, np.zeros(half - rope_angles, np.float32)])
      return (inv / self.factor).astype(np.float32)
    inv = (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    if self.rope_type == "default":
      return inv
    if self.rope_type == "linear":
      return (inv / self.factor).astype(np.float32)
    if self.rope_type == "llama3":
      old = self.original_max_position_embeddings
      low_wavelen = old / self.low_freq_factor
      high_wavelen = old / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32)
    if self.rope_type == "yarn":
      dim = head_dim

      def correction_dim(rot):
        return (dim * math.log(self.original_max_position_embeddings / (rot * 2 * math.pi))) / (
            2 * math.log(base))

      low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
      if self.truncate:
        low, high = math.floor(low), math.ceil(high)
      low, high = max(low, 0), min(high, dim - 1)
      if low == high:
        high += 0.001
      ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1)
      extrapolation = 1 - ramp
      pos = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
      return ((1.0 / (self.factor * pos)) * (1 - extrapolation) +
              (1.0 / pos) * extrapolation).astype(np.float32)
    raise AssertionError(self.rope_type)

  @property
  def attention_scaling(self) -> float:
    """Multiplier on cos/sin (only yarn changes it)."""
    if self.rope_type != "yarn":
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)
    return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only text model architecture (all families).

  Per-layer geometry lives in tuples indexed by layer, so Gemma 4's wider global
  layers and KV-shared layers need no special code paths in the decoder.
  """

  family: str  # "llama" | "qwen3" | "gemma3" | "gemma4"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  layer_types: tuple[str, ...]
  rope_full: RopeConfig = RopeConfig()
  rope_sliding: RopeConfig | None = None
  sliding_window: int | None = None
  layer_head_dims: tuple[int, ...] = ()
  layer_kv_heads: tuple[int, ...] = ()
  rms_norm_eps: float = 1e-6
  norm_offset: float = 0.0  # Gemma 3 stores RMSNorm weights as w with scale (1 + w)
  # RMSNorm applies its weight after casting back to the input dtype (Llama/Qwen order) or in
  # float32 (Gemma order); identical in float32. None: from the family at construction.
  norm_cast_first: bool | None = None
  qk_norm: bool = False
  v_norm: bool = False  # Gemma 4: weightless RMSNorm on values
  sandwich_norm: bool = False  # Gemma: post-attention and pre/post-feedforward norms
  embed_scale: bool = False  # Gemma: embeddings * sqrt(D), rounded to the param dtype
  attn_scale: float = 1.0
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  hidden_act: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  # Gemma 4 only.
  ple_dim: int = 0  # hidden_size_per_layer_input; 0 disables per-layer embeddings
  ple_vocab_size: int = 0
  attention_k_eq_v: bool = False
  num_kv_shared_layers: int = 0
  double_wide_mlp: bool = False
  layer_scalar: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
    for t in self.layer_types:
      if t not in (FULL, SLIDING):
        raise UnsupportedModelError(f"layer type {t!r} is not supported")
    if SLIDING in self.layer_types and not self.sliding_window:
      raise ValueError("sliding_attention layers need a sliding_window")
    if self.norm_cast_first is None:
      object.__setattr__(self, "norm_cast_first", self.family in ("llama", "qwen3"))
    if not self.layer_head_dims:
      object.__setattr__(self, "layer_head_dims", (self.head_dim,) * self.num_layers)
    if not self.layer_kv_heads:
      object.__setattr__(self, "layer_kv_heads", (self.num_kv_heads,) * self.num_layers)
    for i, k in enumerate(self.layer_kv_heads):
      if self.num_heads % k:
        raise ValueError(f"layer {i}: {self.num_heads} heads not divisible by {k} kv heads")
    self.kv_sources  # validates KV sharing

  # ---- derived per-layer properties -------------------------------------------------------
  def norm_kwargs(self, dtype) -> dict:
    """Keyword arguments of this model's (weighted) RMSNorms."""
    return dict(eps=self.rms_norm_eps, offset=self.norm_offset, dtype=dtype,
                cast_first=self.norm_cast_first)

  def rope_for(self, layer: int) -> RopeConfig:
    if self.layer_types[layer] == SLIDING and self.rope_sliding is not None:
      return self.rope_sliding
    return self.rope_full

  def window_for(self, layer: int) -> int | None:
    return self.sliding_window if self.layer_types[layer] == SLIDING else None

  def k_eq_v_for(self, layer: int) -> bool:
    return self.attention_k_eq_v and self.layer_types[layer] == FULL

  def mlp_dim_for(self, layer: int) -> int:
    wide = self.double_wide_mlp and self.kv_sources[layer] != layer
    return self.intermediate_size * (2 if wide else 1)

  @property
  def kv_sources(self) -> tuple[int, ...]:
    """For each layer, the layer whose K/V it attends to (itself unless KV-shared).

    Gemma 4: the last `num_kv_shared_layers` layers reuse the K/V of the last earlier
    non-shared layer of the same type.
    """
    n = self.num_layers
    first_shared = n - self.num_kv_shared_layers
    srcs = list(range(n))
    if self.num_kv_shared_layers:
      for i in range(first_shared, n):
        cands = [j for j in range(first_shared) if self.layer_types[j] == self.layer_types[i]]
        if not cands:
          raise ValueError(f"KV-shared layer {i} ({self.layer_types[i]}) has no earlier layer "
                           "of the same type to share from")
        srcs[i] = cands[-1]
    return tuple(srcs)

  @property
  def cache_layers(self) -> tuple[int, ...]:
    """Layers that own a KV cache entry (in order)."""
    return tuple(i for i, s in enumerate(self.kv_sources) if s == i)

  # ---- construction -----------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any] | Any) -> "ModelConfig":
    """Builds a config from an HF `config.json` dict (or a transformers config object)."""
    if not isinstance(hf, Mapping):
      hf = hf.to_dict()
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type in ("gemma3", "gemma4", "gemma4_unified") and "text_config" in hf:
      text = dict(hf["text_config"])
      for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        text.setdefault(key, hf.get(key))
      hf = text
      model_type = hf.get("model_type", model_type + "_text")
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = hf.get("architectures")
      raise UnsupportedModelError(
          f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
          f"dspark_jax supports model_type in {SUPPORTED_MODEL_TYPES}")
    if model_type.startswith("gemma4"):
      return _gemma4_from_hf(cls, hf)
    if model_type.startswith("gemma3"):
      return _gemma3_from_hf(cls, hf)
    return _llama_qwen_from_hf(cls, hf, model_type)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
    with open(os.path.join(path, "config.json")) as f:
      return cls.from_hf_config(json.load(f))


def _eos_tuple(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def _common(hf: Mapping[str, Any]) -> dict[str, Any]:
  num_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
  return dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=head_dim,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"),
  )


def _act(name: str) -> str:
  table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "gelu": "gelu"}
  if name not in table:
    raise UnsupportedModelError(f"activation {name!r} is not supported")
  return table[name]


def _flat_rope(hf: Mapping[str, Any]) -> RopeConfig:
  """Rope params from either transformers-5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
  params = hf.get("rope_parameters")
  if params is None:
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  return RopeConfig.from_hf(params, hf.get("rope_theta", 10000.0))


def _llama_qwen_from_hf(cls, hf, model_type):
  common = _common(hf)
  if hf.get("use_sliding_window") and model_type == "qwen3":
    raise UnsupportedModelError("Qwen3 use_sliding_window=True is not supported")
  layer_types = hf.get("layer_types") or [FULL] * common["num_layers"]
  if any(t != FULL for t in layer_types):
    raise UnsupportedModelError(f"{model_type}: only full_attention layers are supported")
  return cls(
      family="qwen3" if model_type == "qwen3" else "llama",
      layer_types=tuple(layer_types),
      rope_full=_flat_rope(hf),
      qk_norm=model_type == "qwen3",
      attn_scale=common["head_dim"] ** -0.5,
      hidden_act=_act(hf.get("hidden_act", "silu")),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      **common,
  )


def _typed_rope(hf, default_sliding_theta: float) -> tuple[RopeConfig, RopeConfig]:
  params = hf.get("rope_parameters")
  if params and FULL in params:
    full = RopeConfig.from_hf(params[FULL])
    sliding = RopeConfig.from_hf(params.get(SLIDING) or {"rope_theta": default_sliding_theta})
    return full, sliding
  # Legacy Gemma 3 configs: rope_theta / rope_scaling for global, rope_local_base_freq for local.
  full = _flat_rope(hf)
  sliding = RopeConfig(theta=float(hf.get("rope_local_base_freq", default_sliding_theta)))
  return full, sliding


def _layer_types(hf, n: int, pattern: int) -> tuple[str, ...]:
  types = hf.get("layer_types")
  if types is None:
    pattern = hf.get("sliding_window_pattern", pattern)
    types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
  return tuple(types)


def _gemma3_from_hf(cls, hf):
  common = _common(hf)
  if hf.get("use_bidirectional_attention"):
    raise UnsupportedModelError("Gemma 3 use_bidirectional_attention is not supported")
  full, sliding = _typed_rope(hf, 10000.0)
  return cls(
      family="gemma3",
      layer_types=_layer_types(hf, common["num_layers"], 6),
      rope_full=full,
      rope_sliding=sliding,
      sliding_window=hf.get("sliding_window"),
      norm_offset=1.0,
      qk_norm=True,
      sandwich_norm=True,
      embed_scale=True,
      attn_scale=float(hf.get("query_pre_attn_scalar", common["head_dim"])) ** -0.5,
      # transformers' Gemma 3 reads attn_logit_softcapping but never applies it: neither do we.
      attn_logit_softcap=None,
      final_logit_softcap=hf.get("final_logit_softcapping"),
      hidden_act=_act(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"),
      **common,
  )


def _gemma4_from_hf(cls, hf):
  common = _common(hf)
  if hf.get("enable_moe_block"):
    raise UnsupportedModelError("Gemma 4 MoE (enable_moe_block=True) is not implemented; "
                                "only dense Gemma 4 text checkpoints are supported")
  if hf.get("use_bidirectional_attention"):
    raise UnsupportedModelError("Gemma 4 use_bidirectional_attention is not supported")
  n = common["num_layers"]
  layer_types = list(_layer_types(hf, n, 6))
  layer_types[-1] = FULL  # transformers forces the last layer to full attention
  k_eq_v = bool(hf.get("attention_k_eq_v", False))
  head_dims = [common["head_dim"]] * n
  kv_heads = [common["num_kv_heads"]] * n
  per_layer = hf.get("per_layer_config")
  if per_layer:
    for key, overrides in per_layer.items():
      i = int(key)
      head_dims[i] = overrides.get("head_dim", head_dims[i])
      kv_heads[i] = overrides.get("num_key_value_heads", kv_heads[i])
  else:
    global_head_dim = hf.get("global_head_dim", 512)
    global_kv = hf.get("num_global_key_value_heads") if k_eq_v else None
    for i, t in enumerate(layer_types):
      if t == FULL:
        head_dims[i] = global_head_dim
        if global_kv is not None:
          kv_heads[i] = global_kv
  full, sliding = _typed_rope(hf, 10000.0)
  if hf.get("rope_parameters") is None:
    full = RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25)
  # A missing key means transformers' default (256, per-layer embeddings on); only an
  # explicit 0 / null turns them off, as in transformers.
  ple = hf.get("hidden_size_per_layer_input", 256) or 0
  return cls(
      family="gemma4",
      layer_types=tuple(layer_types),
      rope_full=full,
      rope_sliding=sliding,
      sliding_window=hf.get("sliding_window"),
      layer_head_dims=tuple(head_dims),
      layer_kv_heads=tuple(kv_heads),
      qk_norm=True,
      v_norm=True,
      sandwich_norm=True,
      embed_scale=True,
      attn_scale=1.0,
      final_logit_softcap=hf.get("final_logit_softcapping"),
      hidden_act=_act(hf.get("hidden_activation") or "gelu_pytorch_tanh"),
      ple_dim=ple,
      ple_vocab_size=hf.get("vocab_size_per_layer_input", 262144) if ple else 0,
      attention_k_eq_v=k_eq_v,
      num_kv_shared_layers=hf.get("num_kv_shared_layers", 0) or 0,
      double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
      layer_scalar=True,
      **common,
  )
