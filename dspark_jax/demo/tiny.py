"""Tiny targets: random ones for tests and loop benchmarks, and the quickly-trained "tiny" one.

Built directly in JAX (no torch, no checkpoint): a `ModelConfig`, random weights with a
chosen scale (the default N(0, 0.02) makes tiny models nearly uniform; a larger scale
gives peaked, position-dependent distributions, which the speculative tests need).
`load_target("tiny")` resolves to `tiny_model_dir()`: a 2-layer char-level llama checkpoint
trained for a few seconds on a word-graph chat corpus, built once under the demo cache.

This module imports `dspark_jax.target`; `target` reaches it only lazily, at load time.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.config import FULL, SLIDING, ModelConfig, RopeConfig
from dspark_jax.demo import models as demo_models
from dspark_jax.demo.prompts import synthetic_prompts
from dspark_jax.models import transformer
from dspark_jax.target import Target


def tiny_config(family: str = "qwen3", *, vocab: int = 64, hidden: int = 32, layers: int = 4,
                heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                max_positions: int = 4096) -> ModelConfig:
  """A small config of `family` ("llama", "qwen3", "gemma3" with a sliding window)."""
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                max_position_embeddings=max_positions, eos_token_ids=(), pad_token_id=0)
  if family in ("llama", "qwen3"):
    return ModelConfig(family=family, layer_types=(FULL,) * layers,
                       rope_full=RopeConfig(theta=10000.0), qk_norm=family == "qwen3",
                       attn_scale=head_dim ** -0.5, hidden_act="silu",
                       tie_word_embeddings=family == "llama", **common)
  if family == "gemma3":
    types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
    return ModelConfig(family="gemma3", layer_types=types, rope_full=RopeConfig(theta=1e6),
                       rope_sliding=RopeConfig(theta=1e4), sliding_window=6, norm_offset=1.0,
                       qk_norm=True, sandwich_norm=True, embed_scale=True,
                       attn_scale=head_dim ** -0.5, final_logit_softcap=30.0,
                       hidden_act="gelu_tanh", tie_word_embeddings=True, **common)
  raise ValueError(f"no tiny config for family {family!r}")


def random_target(cfg: ModelConfig, *, seed: int = 0, scale: float = 1.0,
                  dtype=jnp.float32) -> Target:
  """A `Target` with random weights: N(0, 0.02 * scale) kernels/embeddings."""
  model = transformer.CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  if scale != 1.0:
    params = nnx.state(model, nnx.Param)
    scaled = jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)
    nnx.update(model, scaled)
  hf = hf_config_dict(cfg) if cfg.family in ("llama", "qwen3") else None
  return Target(cfg, model, tokenizer=None, mesh=sharding_lib.make_mesh(), dtype=dtype,
                path=None, stop_token_ids=cfg.eos_token_ids, hf_config=hf)


# ---------------------------------------------------------------------------------------------
# A tiny random *checkpoint directory* (HF layout, with a tokenizer and chat template), so the
# whole training pipeline (regenerate -> tokenize -> train -> export -> serve) runs in seconds.
# ---------------------------------------------------------------------------------------------
TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TINY_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<mask>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer_files(path) -> None:
  """Writes a character-level tokenizer (ids: 4 specials, then printable ASCII + newline)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + TINY_CHARS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(TINY_SPECIALS)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
               "eos_token": "<|im_end|>", "bos_token": None, "unk_token": "<pad>",
               "chat_template": CHATML_TEMPLATE, "model_max_length": 4096}, f, indent=2)


def hf_config_dict(cfg: ModelConfig) -> dict:
  """HF `config.json` for a llama/qwen3 ModelConfig (what `from_hf_config` reads back)."""
  if cfg.family not in ("llama", "qwen3"):
    raise ValueError("hf_config_dict supports llama and qwen3 configs")
  return {
      "architectures": ["LlamaForCausalLM" if cfg.family == "llama" else "Qwen3ForCausalLM"],
      "model_type": cfg.family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_full.theta, "tie_word_embeddings": cfg.tie_word_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings, "attention_bias": False,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None,
      "pad_token_id": cfg.pad_token_id, "torch_dtype": "float32",
  }


TINY_VERSION = 5  # bump when the tiny checkpoint recipe changes (cached copies are rebuilt)

# The tiny target's "language": replies are walks on a small word graph (each word has three
# possible successors), spelled out character by character. Inside a word the next character
# is certain, at a word boundary one of three words follows; so the target is neither trivial
# nor random, and a draft has real structure to learn in seconds, as with a real LM.
TINY_WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "tree", "blue",
              "river", "jax", "draft", "block", "token", "fast", "model", "is", "very", "small",
              "seven", "apple", "cloud", "prime", "green", "runs", "with", "light")


def tiny_corpus(n: int, seed: int = 0) -> list[dict]:
  """`n` ChatML conversations: a synthetic prompt and a word-graph reply (see TINY_WORDS)."""
  import random
  graph_rng = random.Random(1234)  # the graph is fixed; `seed` only varies the walks
  succ = {w: graph_rng.sample(TINY_WORDS, 3) for w in TINY_WORDS}
  rng = random.Random(seed)
  out = []
  for row in synthetic_prompts(n, seed=seed):
    w = TINY_WORDS[len(row["turns"][0]) % len(TINY_WORDS)]  # first word set by the prompt
    words = [w]
    for _ in range(rng.randint(6, 12)):
      words.append(rng.choice(succ[words[-1]]))
    out.append([{"role": "user", "content": row["turns"][0]},
                {"role": "assistant", "content": " ".join(words) + "."}])
  return out


def train_tiny_target(target: Target, tokenizer, *, steps: int = 300, batch: int = 32,
                      seq_len: int = 128, lr: float = 3e-3, seed: int = 0) -> Target:
  """Fits `target` to `tiny_corpus` with next-token CE (a few seconds on one CPU core)."""
  import numpy as np
  import optax
  convs = tiny_corpus(steps * batch // 4, seed=seed)
  rows = np.zeros((len(convs), seq_len), np.int32)
  mask = np.zeros((len(convs), seq_len), np.float32)
  for i, conv in enumerate(convs):
    ids = tokenizer.apply_chat_template(conv, add_generation_prompt=False)[:seq_len]
    rows[i, :len(ids)] = ids
    mask[i, :len(ids) - 1] = 1.0
  graphdef, params = nnx.split(target.model)
  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.0)
  opt_state = opt.init(params)

  def loss_fn(p, toks, m):
    logits = nnx.merge(graphdef, p)(toks).logits[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:])
    return jnp.sum(ce * m[:, :-1]) / jnp.sum(m[:, :-1])

  @jax.jit
  def step(p, o, toks, m):
    loss, g = jax.value_and_grad(loss_fn)(p, toks, m)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(rows), batch)
    params, opt_state, _ = step(params, opt_state, jnp.asarray(rows[idx]), jnp.asarray(mask[idx]))
  nnx.update(target.model, params)
  return target


def write_tiny_model_dir(path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                         steps: int = 300) -> str:
  """A tiny llama-family checkpoint dir with a char-level ChatML tokenizer, trained for
  `steps` steps on `tiny_corpus` so that its text has learnable structure."""
  import dataclasses
  import shutil
  from dspark_jax.checkpoints import hf as hf_ckpt
  from dspark_jax.checkpoints.safetensors_io import save_tensors
  from dspark_jax.tokenizer import Tokenizer
  vocab = len(TINY_SPECIALS) + len(TINY_CHARS)
  vocab = (vocab + 7) // 8 * 8
  cfg = tiny_config("llama", vocab=vocab, hidden=hidden, layers=layers, heads=4, kv_heads=2,
                    head_dim=hidden // 4)
  cfg = dataclasses.replace(cfg, eos_token_ids=(TINY_SPECIALS.index("<|im_end|>"),),
                            pad_token_id=0)
  tmp = str(path) + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  tiny_tokenizer_files(tmp)
  target = random_target(cfg, seed=seed)
  train_tiny_target(target, Tokenizer.from_dir(tmp), steps=steps, seed=seed)
  save_tensors(hf_ckpt.export_state(target.model), tmp)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(dict(hf_config_dict(cfg), dspark_jax_tiny_version=TINY_VERSION), f, indent=2)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": list(cfg.eos_token_ids), "pad_token_id": 0}, f)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  return str(path)


def tiny_model_dir() -> str:
  """The directory of the "tiny" target, (re)built when missing or of an older recipe."""
  out = os.path.join(demo_models.cache_root(), "models", "tiny")
  cfg_file = os.path.join(out, "config.json")
  if (not os.path.exists(cfg_file) or json.load(open(cfg_file)).get(
      "dspark_jax_tiny_version") != TINY_VERSION):
    write_tiny_model_dir(out)
  return out
