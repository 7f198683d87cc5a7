"""GGUF -> Hugging Face model directory, without torch.

transformers can load a GGUF file, but only through torch, and it re-dequantizes the file on every
load (about a minute for Gemma 3 270M on two cores). We convert once into a plain HF directory
(`config.json`, float `model.safetensors`, `tokenizer.json`, ...) that the JAX loader and
`AutoTokenizer` read directly. Only `gguf` (numpy dequantization), `safetensors` and `tokenizers`
are used, so the demo works on installs without torch.

What the conversion has to undo (all checked against transformers' GGUF loader in
tests/test_gguf_demo.py):

- GGUF lists tensor dimensions fastest-first; reversed, they are HF's `[out, in]`.
- llama.cpp permutes the rows of Llama's q/k projections so that rotary pairs sit next to each
  other (interleaved RoPE); HF keeps the two halves of each head apart. We invert that.
- llama.cpp stores Gemma's RMSNorm weights as `1 + w` (its kernel multiplies by the weight); HF
  stores `w` and adds 1 in the layer. We subtract 1.
- Tied embeddings: llama.cpp writes `output.weight` only when the head is untied.

The tokenizer is rebuilt from the GGUF vocabulary: byte-level BPE (`tokenizer.ggml.model` "gpt2")
with the file's merges, or, for Gemma's SentencePiece vocabulary ("llama"), a byte-fallback BPE
whose merges are derived from the vocabulary order as transformers does.

Deliberate differences from transformers' (5.23) GGUF loader, where it departs from llama.cpp and
from the original checkpoints: `config.json` names `architectures`; byte-level pre-tokenizers
follow llama.cpp's table for `tokenizer.ggml.pre` (SmolLM2's "smollm" isolates every numeric
character, which transformers skips); Gemma 3's `query_pre_attn_scalar` is the head dim (hidden /
heads for the 62-layer 27B) instead of a constant 256; linear rope scaling is kept; tensors or
rope settings we cannot represent raise instead of being dropped. For SmolLM2-135M-Instruct and
Gemma 3 270M every tensor, config value and token id outside non-ASCII numerals is identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Callable

import numpy as np

# Bump when the output of the conversion changes, so cached conversions get redone.
CONVERTER_VERSION = 1

# GGUF `general.architecture` values we can convert (HF model_type in brackets):
# llama [llama], qwen3 [qwen3], gemma3 [gemma3_text].
SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen3")

# Written next to the model so a cache can tell what produced a directory.
CONVERSION_INFO_NAME = "gguf_conversion.json"

_DTYPES = ("float32", "bfloat16", "float16")

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# llama.cpp's pre-tokenizer regexes for byte-level BPE vocabularies, by `tokenizer.ggml.pre`.
# The GPT-2 split is what `tokenizers`' ByteLevel(use_regex=True) does itself.
_SPLIT_GPT2 = "gpt2"
# StarCoder-style: every numeric character is its own piece, then the GPT-2 split. This is what
# SmolLM2's own tokenizer.json does (a `Digits(individual_digits=True)` pre-tokenizer) and what
# llama.cpp does for pre "smollm"; transformers' GGUF loader (5.23) skips the digit split, which
# only changes the result for runs of non-ASCII numerals such as " ²²" (ASCII digits never merge
# in these vocabularies).
_SPLIT_DIGITS_GPT2 = "digits+gpt2"
_SPLIT_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_PRE = {
    "default": _SPLIT_GPT2, "gpt2": _SPLIT_GPT2, "gpt-2": _SPLIT_GPT2, "mpt": _SPLIT_GPT2,
    "olmo": _SPLIT_GPT2, "jais": _SPLIT_GPT2,
    "smollm": _SPLIT_DIGITS_GPT2, "starcoder": _SPLIT_DIGITS_GPT2, "refact": _SPLIT_DIGITS_GPT2,
    "command-r": _SPLIT_DIGITS_GPT2, "codeshell": _SPLIT_DIGITS_GPT2,
    "exaone": _SPLIT_DIGITS_GPT2, "minerva-7b": _SPLIT_DIGITS_GPT2,
    "llama3": _SPLIT_LLAMA3, "llama-v3": _SPLIT_LLAMA3, "llama-bpe": _SPLIT_LLAMA3,
    "smaug-bpe": _SPLIT_LLAMA3, "dbrx": _SPLIT_LLAMA3, "falcon3": _SPLIT_LLAMA3,
    "qwen2": _SPLIT_QWEN2, "deepseek-r1-qwen": _SPLIT_QWEN2,
}


class GGUFConversionError(ValueError):
  """The GGUF file is malformed or inconsistent with its own metadata."""


class UnsupportedGGUFError(GGUFConversionError):
  """The GGUF file describes a model or tokenizer this converter does not handle."""


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Metadata:
  """GGUF key/value metadata with helpers for the `<arch>.` prefix."""

  values: dict[str, Any]
  arch: str

  def get(self, key: str, default: Any = None) -> Any:
    return self.values.get(key, default)

  def arch_get(self, key: str, default: Any = None) -> Any:
    return self.values.get(f"{self.arch}.{key}", default)

  def arch_require(self, key: str) -> Any:
    full = f"{self.arch}.{key}"
    if full not in self.values:
      raise GGUFConversionError(f"GGUF metadata lacks required key {full!r}")
    return self.values[full]


def _open_reader(path: pathlib.Path):
  """A `gguf.GGUFReader` over a plain-ndarray view of the file's memory map.

  GGUFReader parses metadata one element at a time with numpy slicing; on a `np.memmap` every
  slice pays memmap's subclass bookkeeping, which makes Gemma's 262k-token vocabulary take
  ~16 s to parse instead of ~6 s. A plain `ndarray` view of the same mapping behaves
  identically (the views keep the mapping alive) without that cost.
  """
  from gguf import GGUFReader

  class _PlainArrayReader(GGUFReader):

    @property
    def data(self):
      return self._plain_data

    @data.setter
    def data(self, value):
      self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

  return _PlainArrayReader(path)


def _read_metadata(reader) -> _Metadata:
  values = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):  # header fields (version, counts), not metadata
      continue
    values[key] = field.contents()
  arch = values.get("general.architecture")
  if not arch:
    raise GGUFConversionError("GGUF metadata lacks general.architecture")
  return _Metadata(values, arch)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def _special_ids(meta: _Metadata) -> dict[str, int]:
  ids = {}
  for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id"),
                           ("unk_token_id", "unknown_token_id")):
    value = meta.get(f"tokenizer.ggml.{gguf_key}")
    if value is not None:
      ids[hf_key] = int(value)
  return ids


def _vocab_size(meta: _Metadata) -> int:
  size = meta.arch_get("vocab_size")
  if size is None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise GGUFConversionError("GGUF metadata has neither <arch>.vocab_size nor a token list")
    size = len(tokens)
  return int(size)


def _common_config(meta: _Metadata, tensor_names: set[str], dtype: str) -> dict[str, Any]:
  if meta.arch_get("expert_count"):
    raise UnsupportedGGUFError(
        f"GGUF {meta.arch} file is a mixture-of-experts model (expert_count="
        f"{meta.arch_get('expert_count')}); only dense models are supported")
  return {
      "vocab_size": _vocab_size(meta),
      "hidden_size": int(meta.arch_require("embedding_length")),
      "intermediate_size": int(meta.arch_require("feed_forward_length")),
      "num_hidden_layers": int(meta.arch_require("block_count")),
      "num_attention_heads": int(meta.arch_require("attention.head_count")),
      "num_key_value_heads": int(meta.arch_get("attention.head_count_kv")
                                 or meta.arch_require("attention.head_count")),
      "max_position_embeddings": int(meta.arch_require("context_length")),
      # The file stores float32; float() keeps that exact value, as transformers does.
      "rms_norm_eps": float(meta.arch_require("attention.layer_norm_rms_epsilon")),
      # llama.cpp writes the output projection only when it is not the embedding matrix.
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": dtype,
      **_special_ids(meta),
  }


def _rope_parameters(meta: _Metadata, theta: float) -> dict[str, Any]:
  params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(theta)}
  scaling = meta.arch_get("rope.scaling.type")
  if scaling in (None, "none"):
    return params
  if scaling == "linear":
    params.update(rope_type="linear", factor=float(meta.arch_require("rope.scaling.factor")))
    return params
  raise UnsupportedGGUFError(
      f"GGUF {meta.arch} rope scaling {scaling!r} is not supported (supported: none, linear)")


def _check_no_rope_freqs(meta: _Metadata, tensor_names: set[str]) -> None:
  # Llama 3.1-style frequency factors live in a tensor; ignoring it would silently change every
  # position's rotary angles.
  if "rope_freqs.weight" in tensor_names:
    raise UnsupportedGGUFError(
        f"GGUF {meta.arch} file carries rope_freqs.weight (Llama-3.1-style rope scaling), "
        "which this converter does not support")


def _llama_config(meta: _Metadata, tensor_names: set[str], dtype: str) -> dict[str, Any]:
  _check_no_rope_freqs(meta, tensor_names)
  config = _common_config(meta, tensor_names, dtype)
  head_dim = meta.arch_get("rope.dimension_count") or meta.arch_get("attention.key_length")
  head_dim = int(head_dim or config["hidden_size"] // config["num_attention_heads"])
  key_length = meta.arch_get("attention.key_length")
  if key_length is not None and int(key_length) != head_dim:
    raise UnsupportedGGUFError(
        f"GGUF llama rotates {head_dim} of {key_length} head dims (partial rotary); not supported")
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      **config,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rope_parameters": _rope_parameters(meta, meta.arch_get("rope.freq_base", 10000.0)),
      "attention_bias": "blk.0.attn_q.bias" in tensor_names,
      "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
      "pretraining_tp": 1,
  }


def _qwen3_config(meta: _Metadata, tensor_names: set[str], dtype: str) -> dict[str, Any]:
  _check_no_rope_freqs(meta, tensor_names)
  config = _common_config(meta, tensor_names, dtype)
  head_dim = int(meta.arch_get("attention.key_length")
                 or config["hidden_size"] // config["num_attention_heads"])
  return {
      "architectures": ["Qwen3ForCausalLM"],
      "model_type": "qwen3",
      **config,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rope_parameters": _rope_parameters(meta, meta.arch_get("rope.freq_base", 10000.0)),
      "attention_bias": "blk.0.attn_q.bias" in tensor_names,
      "use_sliding_window": False,
      "sliding_window": None,
      "layer_types": ["full_attention"] * config["num_hidden_layers"],
  }


def _gemma3_layer_types(meta: _Metadata, n_layers: int) -> list[str]:
  pattern = meta.arch_get("attention.sliding_window_pattern")
  if isinstance(pattern, list):  # newer llama.cpp: one flag per layer, true = sliding window
    if len(pattern) != n_layers:
      raise GGUFConversionError(
          f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} "
          "layers")
    return ["sliding_attention" if p else "full_attention" for p in pattern]
  # llama.cpp hard-codes Gemma 3's period: five sliding-window layers, then one global layer.
  period = int(pattern or 6)
  return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layers)]


def _gemma3_config(meta: _Metadata, tensor_names: set[str], dtype: str) -> dict[str, Any]:
  config = _common_config(meta, tensor_names, dtype)
  n_layers = config["num_hidden_layers"]
  head_dim = int(meta.arch_require("attention.key_length"))
  # Queries are scaled by query_pre_attn_scalar**-0.5: head_dim for every Gemma 3 size except 27B
  # (62 layers), which uses hidden/heads. llama.cpp applies the same rule; the file has no key.
  scalar = (config["hidden_size"] // config["num_attention_heads"] if n_layers == 62
            else head_dim)
  full_rope = _rope_parameters(meta, meta.arch_get("rope.freq_base", 1_000_000.0))
  # Local layers use 10k unless the file says otherwise (llama.cpp's default for Gemma 3).
  sliding_rope = {"rope_type": "default",
                  "rope_theta": float(meta.arch_get("rope.freq_base_swa", 10000.0))}
  return {
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      **config,
      "head_dim": head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": scalar,
      "sliding_window": int(meta.arch_require("attention.sliding_window")),
      "layer_types": _gemma3_layer_types(meta, n_layers),
      "rope_parameters": {"sliding_attention": sliding_rope, "full_attention": full_rope},
      "final_logit_softcapping": meta.arch_get("final_logit_softcapping"),
      "attn_logit_softcapping": meta.arch_get("attn_logit_softcapping"),
      "attention_bias": False,
      "use_bidirectional_attention": False,
  }


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_ATTN_MLP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LAYER_TENSORS = {
    "llama": {**_ATTN_MLP, "ffn_norm": "post_attention_layernorm"},
    "qwen3": {**_ATTN_MLP, **_QK_NORM, "ffn_norm": "post_attention_layernorm"},
    # Gemma's sandwich norms: llama.cpp's ffn_norm is the *pre*-feedforward norm.
    "gemma3": {**_ATTN_MLP, **_QK_NORM, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}


def _hf_name(arch: str, gguf_name: str) -> str | None:
  """GGUF tensor name -> HF name, or None if this architecture has no such tensor."""
  stem, dot, suffix = gguf_name.rpartition(".")
  if not dot or suffix not in ("weight", "bias"):
    return None
  if stem in _GLOBAL_TENSORS:
    return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
  parts = stem.split(".")
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
    target = _LAYER_TENSORS[arch].get(parts[2])
    if target is not None:
      return f"model.layers.{int(parts[1])}.{target}.{suffix}"
  return None


def unpermute_llama_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation for Llama checkpoints.

  HF rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs, so
  its converter reorders each head's rows from `[half, pair]` to `[pair, half]`. Reading a
  head's rows as `[pair, half]` and swapping back restores HF's order.

  Args:
    weight: `[n_heads * head_dim, ...]` rows as stored in the GGUF file (HF `[out, in]` layout
      or a 1-D bias).
    n_heads: heads the rows span (query heads for q, key/value heads for k).
  """
  rows = weight.shape[0]
  if rows % (2 * n_heads):
    raise GGUFConversionError(f"cannot un-permute {weight.shape} rows over {n_heads} heads")
  half = rows // n_heads // 2
  split = weight.reshape(n_heads, half, 2, *weight.shape[1:])
  return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(weight.shape)


def _expected_tensors(arch: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape the config implies (weights only; biases are checked loosely)."""
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  nq = config["num_attention_heads"] * config["head_dim"]
  nkv = config["num_key_value_heads"] * config["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not config["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, d)
  per_layer = {
      "input_layernorm": (d,), "self_attn.q_proj": (nq, d), "self_attn.k_proj": (nkv, d),
      "self_attn.v_proj": (nkv, d), "self_attn.o_proj": (d, nq), "mlp.gate_proj": (f, d),
      "mlp.up_proj": (f, d), "mlp.down_proj": (d, f), "post_attention_layernorm": (d,),
  }
  if arch in ("qwen3", "gemma3"):
    per_layer.update({"self_attn.q_norm": (config["head_dim"],),
                      "self_attn.k_norm": (config["head_dim"],)})
  if arch == "gemma3":
    per_layer.update({"pre_feedforward_layernorm": (d,), "post_feedforward_layernorm": (d,)})
  for i in range(config["num_hidden_layers"]):
    for name, shape in per_layer.items():
      shapes[f"model.layers.{i}.{name}.weight"] = shape
  return shapes


def _convert_tensors(reader, arch: str, config: dict[str, Any],
                     dtype: str) -> dict[str, np.ndarray]:
  from gguf.quants import dequantize

  np_dtype = _numpy_dtype(dtype)
  unknown = []
  tensors: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    hf_name = _hf_name(arch, tensor.name)
    if hf_name is None:
      unknown.append(tensor.name)
      continue
    try:
      value = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
      raise UnsupportedGGUFError(
          f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} cannot be dequantized by "
          f"the installed gguf package ({e})") from e
    # GGUF lists dims fastest-first; numpy wants them slowest-first (= HF's [out, in]).
    shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
    value = np.asarray(value, dtype=np.float32).reshape(shape)
    if arch == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
      heads = (config["num_attention_heads"] if ".attn_q." in tensor.name
               else config["num_key_value_heads"])
      value = unpermute_llama_qk(value, heads)
    if arch == "gemma3" and tensor.name.endswith("norm.weight"):
      value = value - np.float32(1.0)  # llama.cpp stores 1 + w (see module docstring)
    tensors[hf_name] = np.ascontiguousarray(value.astype(np_dtype, copy=False))
  if unknown:
    raise UnsupportedGGUFError(
        f"GGUF {arch} file has tensors this converter does not know how to map: "
        f"{sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}")
  expected = _expected_tensors(arch, config)
  missing = sorted(set(expected) - set(tensors))
  wrong = {k: (tensors[k].shape, s) for k, s in expected.items()
           if k in tensors and tuple(tensors[k].shape) != s}
  extra = sorted(k for k in set(tensors) - set(expected) if not k.endswith(".bias"))
  if missing or wrong or extra:
    raise GGUFConversionError(
        f"GGUF tensors do not match the model its metadata describes: missing={missing[:10]} "
        f"unexpected={extra[:10]} wrong shapes (got, want)={dict(list(wrong.items())[:10])}")
  return tensors


def _numpy_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes  # numpy has no bfloat16; ml_dtypes ships with jax
    return ml_dtypes.bfloat16
  return np.dtype(dtype)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

  Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
  moved to code points 256 and up, in byte order.
  """
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(
      range(0xAE, 0x100))
  table, shifted = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + shifted)
      shifted += 1
  return table


@dataclasses.dataclass
class _TokenizerSpec:
  tokenizer: Any  # tokenizers.Tokenizer
  tokenizer_class: str
  special: dict[str, str]  # bos_token / eos_token / unk_token / pad_token -> token text
  add_bos: bool
  add_eos: bool


def _token_types(meta: _Metadata, tokens: list[str]) -> list[int]:
  types = meta.get("tokenizer.ggml.token_type")
  if types is None:
    return [1] * len(tokens)  # all normal
  if len(types) != len(tokens):
    raise GGUFConversionError(
        f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
  return list(types)


def _special_token_texts(meta: _Metadata, tokens: list[str]) -> dict[str, str]:
  texts = {}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= int(token_id) < len(tokens):
        raise GGUFConversionError(f"tokenizer.ggml.{key}={token_id} is outside the vocabulary")
      texts[name] = tokens[int(token_id)]
  return texts


def _add_gguf_added_tokens(tok, tokens: list[str], token_types: list[int], vocab: dict[str, int],
                           specials: dict[str, str], byte_alphabet: set[str] | None) -> None:
  """Registers control tokens as special and user-defined tokens as plain added tokens.

  Both must be matched whole in raw text (llama.cpp does), or e.g. `<|im_end|>` would be cut
  into byte pieces. A control token spelled outside the byte alphabet of a byte-level vocabulary
  is a llama.cpp mislabel: it is not in the BPE vocabulary, so adding it would grow the vocab.
  """
  from tokenizers import AddedToken

  typed = list(zip(tokens, token_types, strict=True))
  control = [t for t, ty in typed if ty == _TOKEN_CONTROL
             and (byte_alphabet is None or set(t) <= byte_alphabet)]
  if control:
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
  user = [t for t, ty in typed if ty == _TOKEN_USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  # bos/eos/unk/pad are special even if the file typed them as normal tokens.
  done = set(control)
  rest = [t for t in specials.values() if t not in done]
  if rest:
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(rest)])


def _post_processor(specials: dict[str, str], vocab_ids: dict[str, int], add_bos: bool,
                    add_eos: bool):
  """`<bos>` / `<eos>` around each sequence, as transformers' `update_post_processor` builds."""
  from tokenizers import processors

  bos, eos = specials.get("bos_token"), specials.get("eos_token")
  add_bos = add_bos and bos is not None
  add_eos = add_eos and eos is not None
  single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
  pair = (f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1"
          f"{' ' + eos + ':1' if add_eos else ''}")
  special_tokens = []
  if add_bos:
    special_tokens.append((bos, vocab_ids[bos]))
  if add_eos:
    special_tokens.append((eos, vocab_ids[eos]))
  return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


def _byte_level_pre_tokenizer(pre: str | None):
  from tokenizers import Regex, pre_tokenizers

  split = _BYTE_LEVEL_PRE.get(pre or "default")
  if split is None:
    raise UnsupportedGGUFError(
        f"byte-level BPE pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
        f"(supported: {sorted(_BYTE_LEVEL_PRE)})")
  # ByteLevel's own regex is the GPT-2 split; after a custom Split it must not split again.
  gpt2_regex = split in (_SPLIT_GPT2, _SPLIT_DIGITS_GPT2)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                        use_regex=gpt2_regex)
  if split == _SPLIT_GPT2:
    return byte_level
  if split == _SPLIT_DIGITS_GPT2:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                  byte_level])


def _byte_level_tokenizer(meta: _Metadata) -> _TokenizerSpec:
  from tokenizers import Tokenizer, decoders, models

  tokens = list(meta.get("tokenizer.ggml.tokens"))
  token_types = _token_types(meta, tokens)
  merges = meta.get("tokenizer.ggml.merges")
  if merges is None:
    raise GGUFConversionError("byte-level BPE GGUF tokenizer has no tokenizer.ggml.merges")
  to_unicode = _byte_to_unicode()
  alphabet = set(to_unicode.values())
  vocab = {}
  for index, token in enumerate(tokens):
    # Some files spell a token in raw UTF-8 instead of the byte alphabet; re-spell those.
    if not set(token) <= alphabet:
      token = "".join(to_unicode[b] for b in token.encode("utf-8"))
    vocab[token] = index
  pairs = [tuple(m.split(" ")) for m in merges]
  bad = [m for m, p in zip(merges, pairs, strict=True) if len(p) != 2]
  if bad:
    raise GGUFConversionError(f"malformed BPE merges (want 'left right'): {bad[:5]}")
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                             continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False, byte_fallback=False))
  tok.normalizer = None
  tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
  tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
  specials = _special_token_texts(meta, tokens)
  _add_gguf_added_tokens(tok, tokens, token_types, vocab, specials, alphabet)
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  tok.post_processor = _post_processor(specials, tok.get_vocab(), add_bos, add_eos)
  return _TokenizerSpec(tok, "TokenizersBackend", specials, add_bos, add_eos)


def _gemma_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary, best first.

  Gemma files carry no merges. Every split of a token into two vocabulary pieces is a merge;
  merges rank by the token's position in the file (Gemma's scores do not follow its merge order,
  the file order does), and within one token by longer left piece first. This is the order
  transformers derives, so both tokenizers agree.
  """
  merges = []
  for index, token in enumerate(tokens):
    if vocab[token] != index:  # a duplicate: ranked at its last occurrence, like the vocab id
      continue
    for cut in range(len(token) - 1, 0, -1):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        merges.append((left, right))
  return merges


def _gemma_tokenizer(meta: _Metadata) -> _TokenizerSpec:
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

  tokens = list(meta.get("tokenizer.ggml.tokens"))
  token_types = _token_types(meta, tokens)
  # The file spells whitespace-only tokens with real spaces, while the normalizer below turns
  # spaces into U+2581 before lookup: re-spell them or they could never match.
  spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
  vocab = {t: i for i, t in enumerate(spelled)}
  specials = _special_token_texts(meta, tokens)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=_gemma_merges(spelled, vocab), dropout=None,
                             unk_token=specials.get("unk_token", "<unk>"), fuse_unk=True,
                             byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
  tok.decoder = decoders.Sequence(
      [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
  _add_gguf_added_tokens(tok, tokens, token_types, vocab, specials, None)
  # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  tok.post_processor = _post_processor(specials, tok.get_vocab(), add_bos, add_eos)
  return _TokenizerSpec(tok, "GemmaTokenizer", specials, add_bos, add_eos)


def _build_tokenizer(meta: _Metadata) -> _TokenizerSpec:
  model = meta.get("tokenizer.ggml.model")
  if meta.get("tokenizer.ggml.tokens") is None:
    raise GGUFConversionError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
  if model == "gpt2":
    return _byte_level_tokenizer(meta)
  if model == "llama" and meta.arch == "gemma3":
    return _gemma_tokenizer(meta)
  raise UnsupportedGGUFError(
      f"GGUF tokenizer model {model!r} for architecture {meta.arch!r} is not supported "
      "(supported: 'gpt2' byte-level BPE for any architecture, 'llama' SentencePiece for gemma3)")


def _tokenizer_config(meta: _Metadata, spec: _TokenizerSpec, config: dict) -> dict[str, Any]:
  tc: dict[str, Any] = {
      "tokenizer_class": spec.tokenizer_class,
      "backend": "tokenizers",
      **spec.special,
      "add_bos_token": spec.add_bos,
      "add_eos_token": spec.add_eos,
      "model_max_length": config["max_position_embeddings"],
      "clean_up_tokenization_spaces": False,
  }
  template = meta.get("tokenizer.chat_template")
  if template:
    tc["chat_template"] = template
  return tc


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

_CONFIG_BUILDERS: dict[str, Callable[[_Metadata, set[str], str], dict[str, Any]]] = {
    "llama": _llama_config,
    "qwen3": _qwen3_config,
    "gemma3": _gemma3_config,
}
assert tuple(sorted(_CONFIG_BUILDERS)) == SUPPORTED_ARCHITECTURES


def _write_json(path: pathlib.Path, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")


def _current_umask() -> int:
  # os.umask can only be read by setting it, which races with other threads creating files.
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return 0o022


def _set_default_permissions(path: pathlib.Path) -> None:
  """mkdtemp (and safetensors) create owner-only entries; give them the usual umask modes."""
  umask = _current_umask()
  os.chmod(path, 0o777 & ~umask)
  for child in path.iterdir():
    os.chmod(child, 0o666 & ~umask)


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Moves the finished `src` to `dst`, replacing an existing `dst`.

  A directory rename cannot overwrite a non-empty directory, so the old one is first moved
  aside; readers see either the old or the new complete directory, or (for an instant) none.
  """
  if not (dst.exists() or dst.is_symlink()):
    os.rename(src, dst)
    return
  trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
  os.rename(dst, trash)
  try:
    os.rename(src, dst)
  except BaseException:
    os.rename(trash, dst)  # put the old model back rather than leave nothing
    raise
  if trash.is_symlink():
    trash.unlink()
  else:
    shutil.rmtree(trash, ignore_errors=True)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       dtype: str = "float32",
                       extra_info: dict[str, Any] | None = None) -> pathlib.Path:
  """Converts a GGUF checkpoint into a Hugging Face model directory, without torch.

  Writes `config.json`, `generation_config.json`, `model.safetensors` (dequantized weights with
  HF names and `[out, in]` layout), `tokenizer.json`, `tokenizer_config.json` (incl. the chat
  template the file carries) and `gguf_conversion.json` (provenance). The directory is built
  next to `out_dir` and renamed into place, so an interrupted conversion never leaves a partial
  model at `out_dir`; an existing `out_dir` is replaced.

  Args:
    gguf_path: the `.gguf` file (architectures: see `SUPPORTED_ARCHITECTURES`).
    out_dir: directory to create.
    dtype: "float32" (default), "bfloat16" or "float16" for the saved weights. Dequantization
      is done in float32 either way.
    extra_info: JSON-serialisable entries added to `gguf_conversion.json` (callers use them to
      recognise their own conversions, e.g. a cache key); written atomically with the model.

  Returns:
    `out_dir` as a `pathlib.Path`.

  Raises:
    FileNotFoundError: `gguf_path` does not exist.
    UnsupportedGGUFError: unsupported architecture, tokenizer, rope scaling or tensor type.
    GGUFConversionError: the file is inconsistent (missing keys, tensors or shapes).
  """
  gguf_path = pathlib.Path(gguf_path)
  out_dir = pathlib.Path(out_dir).expanduser().absolute()
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
  if not gguf_path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"output path exists and is not a directory: {out_dir}")
  try:
    reader = _open_reader(gguf_path)
  except ValueError as e:  # bad magic / unsupported GGUF version
    raise GGUFConversionError(f"{gguf_path} is not a readable GGUF file: {e}") from e
  meta = _read_metadata(reader)
  if meta.arch not in _CONFIG_BUILDERS:
    raise UnsupportedGGUFError(
        f"GGUF architecture {meta.arch!r} ({gguf_path.name}) is not supported; supported "
        f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
  tensor_names = {t.name for t in reader.tensors}
  config = _CONFIG_BUILDERS[meta.arch](meta, tensor_names, dtype)
  # The tokenizer first: it is cheap to fail on, the tensors are not.
  spec = _build_tokenizer(meta)
  tensors = _convert_tensors(reader, meta.arch, config, dtype)

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    from safetensors.numpy import save_file

    # "format": "pt" is what transformers expects in the header of a PyTorch-layout file.
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(tmp / "config.json", config)
    generation = {"_from_model_config": True}
    generation.update({k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                       if k in config})
    _write_json(tmp / "generation_config.json", generation)
    spec.tokenizer.save(str(tmp / "tokenizer.json"))
    _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta, spec, config))
    stat = gguf_path.stat()
    _write_json(tmp / CONVERSION_INFO_NAME, {
        "converter_version": CONVERTER_VERSION,
        "source": gguf_path.name,
        "source_bytes": stat.st_size,
        "architecture": meta.arch,
        "model_name": meta.get("general.name"),
        "dtype": dtype,
        **(extra_info or {}),
    })
    _set_default_permissions(tmp)
    _replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir

