"""Target models: loading HF checkpoints (local dir, hub id or embedded demo) into NNX."""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.checkpoints import hf as hf_ckpt
from dspark_jax.checkpoints.safetensors_io import TensorReader
from dspark_jax.config import ModelConfig
from dspark_jax.models import transformer
from dspark_jax.tokenizer import Tokenizer, generation_eos_ids
from dspark_jax.typing import Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "fp32": jnp.float32, "bf16": jnp.bfloat16}

# Checkpoint tensors a text decoder may legitimately leave unused.
_ALWAYS_IGNORED = (r".*rotary_emb\.inv_freq",)
_MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
                        "model.embed_audio.", "model.multi_modal_projector.", "vision_tower.",
                        "multi_modal_projector.", "model.vision_model.")


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  return jnp.dtype(dtype)


class Target:
  """A loaded target model.

  Attributes:
    config: `ModelConfig`.
    tokenizer: `Tokenizer` or None (random test models have none).
    graphdef, params: the NNX model split for crossing `jax.jit`.
    mesh: device mesh the params are sharded over.
    dtype: parameter/compute dtype.
    stop_token_ids: default stop ids (generation_config eos, config eos, tokenizer eos).
  """

  def __init__(self, config: ModelConfig, model: nnx.Module, *, tokenizer: Tokenizer | None,
               mesh, dtype, path: str | None = None, stop_token_ids=(), hf_config=None):
    self.config = config
    self.hf_config = hf_config  # the checkpoint's config.json (drafts copy it when saved)
    self.graphdef, self.params = nnx.split(model)
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.dtype = dtype
    self.path = path
    self.stop_token_ids = tuple(dict.fromkeys(int(t) for t in stop_token_ids))

  @property
  def model(self) -> transformer.CausalLM:
    return nnx.merge(self.graphdef, self.params)

  def check_token_ids(self, ids) -> None:
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got range "
                       f"[{arr.min()}, {arr.max()}]")

  def logits(self, token_ids) -> Array:
    """Full-sequence logits (no cache).

    Args:
      token_ids: int `[B, T]` (or `[T]`).

    Returns:
      float32 `[B, T, V]`.
    """
    ids = jnp.asarray(token_ids, jnp.int32)
    if ids.ndim == 1:
      ids = ids[None]
    self.check_token_ids(ids)
    return _full_logits(self.graphdef, self.params, ids)

  def forward(self, token_ids, *, taps=()):
    """Full-sequence forward returning `ForwardOutput` (logits, final hidden, taps)."""
    ids = jnp.asarray(token_ids, jnp.int32)
    self.check_token_ids(ids)
    return _full_forward(self.graphdef, self.params, ids, tuple(taps))

  def __repr__(self):
    return (f"Target({self.config.family}, layers={self.config.num_layers}, "
            f"hidden={self.config.hidden_size}, vocab={self.config.vocab_size}, "
            f"dtype={jnp.dtype(self.dtype).name}, path={self.path!r})")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_logits(graphdef, params, ids):
  return nnx.merge(graphdef, params)(ids).logits


@functools.partial(jax.jit, static_argnames=("graphdef", "taps"))
def _full_forward(graphdef, params, ids, taps):
  return nnx.merge(graphdef, params)(ids, taps=taps)


def resolve_model_path(path_or_id: str | os.PathLike) -> str:
  """Local dir as is; a registered demo name via the demo cache; else a hub id download."""
  path = os.fspath(path_or_id)
  if os.path.isdir(path):
    return path
  # Lazy: the demo package imports this module (for `Target`), never the reverse at import time.
  from dspark_jax import demo
  demo_dir = demo.resolve_model_name(path)  # "tiny", "demo" or an embedded demo model
  if demo_dir is not None:
    return demo_dir
  if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                     "*.jinja", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown repo, ...
      raise FileNotFoundError(
          f"{path!r} is not a local directory and could not be fetched from the Hugging Face "
          f"hub ({type(e).__name__}: {e})") from e
  raise FileNotFoundError(f"model path {path!r} does not exist")


def _ignore_patterns(cfg: ModelConfig) -> list[str]:
  ignore = list(_ALWAYS_IGNORED)
  if cfg.tie_word_embeddings:
    ignore.append(r"lm_head\.weight")
  for i, src in enumerate(cfg.kv_sources):
    if src != i:  # transformers also drops these for KV-shared layers
      ignore.append(rf"model\.layers\.{i}\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\..*")
  return ignore


def _text_key(name: str) -> str | None:
  """Maps multimodal checkpoint names onto the text decoder's (`model.language_model.x` -> `model.x`)."""
  if name.startswith(_MULTIMODAL_PREFIXES):
    return None
  for pre, rep in (("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head.")):
    if name.startswith(pre):
      return rep + name[len(pre):]
  return name


def load_target(path_or_id: str | os.PathLike, *, dtype="float32", mesh=None,
                rules=sharding_lib.DEFAULT_RULES) -> Target:
  """Loads an HF causal-LM checkpoint (config.json + safetensors) without torch.

  Args:
    path_or_id: a local HF directory, a hub id (needs network), or a demo model name
      (`"smollm2-135m-instruct"`, `"demo"`).
    dtype: "float32" (CPU) or "bfloat16" (GPU/TPU).
    mesh: a `jax.sharding.Mesh` over (data, fsdp, tensor); default: 1 device.

  Returns:
    Target.
  """
  path = resolve_model_path(path_or_id)
  with open(os.path.join(path, "config.json")) as f:
    hf_config = json.load(f)
  cfg = ModelConfig.from_hf_config(hf_config)
  jdtype = resolve_dtype(dtype)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  abstract = transformer.abstract_model(cfg, jdtype)
  shardings = sharding_lib.state_shardings(nnx.state(abstract), mesh, rules)
  reader = TensorReader(path).rename(_text_key)
  try:
    model = hf_ckpt.load_into(abstract, path, dtype=jdtype, ignore=_ignore_patterns(cfg),
                              shardings=shardings, reader=reader)
  finally:
    reader.close()
  tokenizer = Tokenizer.from_dir(path)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model vocab is "
                     f"{cfg.vocab_size}")
  stops = list(generation_eos_ids(path)) + list(cfg.eos_token_ids)
  if tokenizer is not None:
    stops += list(tokenizer.eos_token_ids)
  return Target(cfg, model, tokenizer=tokenizer, mesh=mesh, dtype=jdtype, path=path,
                stop_token_ids=stops, hf_config=hf_config)
