"""Draft checkpoints: DeepSpec format in, same format out (bit-exact), and clear errors."""

import hashlib
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dspark_jax as dj
from dspark_jax.demo import tiny
from dspark_jax.drafts import api as draft_api
from dspark_jax.drafts.checkpoint import config_from_json


@pytest.fixture(scope="module")
def target():
  return tiny.random_target(tiny.tiny_config("qwen3", vocab=64, layers=6), scale=4.0)


KINDS = [("dspark", {}), ("dspark", {"markov_head_type": "gated"}),
         ("dspark", {"markov_head_type": "rnn"}), ("dflash", {}),
         ("dflash", {"anchor_first": False}), ("eagle3", {})]


def _md5(path):
  return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("algorithm,kw", KINDS)
def test_round_trip_is_bit_exact(target, tmp_path, algorithm, kw):
  d = draft_api.init_draft(target, algorithm, num_layers=2, block_size=4,
                           target_layer_ids=(1, 3), markov_rank=8, **kw)
  p1 = dj.save_draft(d, tmp_path / "a")
  loaded = dj.load_draft(p1, target)
  assert loaded.config == d.config
  p2 = dj.save_draft(loaded, tmp_path / "b")
  assert _md5(os.path.join(p1, "model.safetensors")) == _md5(os.path.join(p2, "model.safetensors"))
  # float32 on disk: the loaded params equal the originals exactly.
  p3 = dj.save_draft(d, tmp_path / "c", dtype="float32")
  exact = dj.load_draft(p3, target)
  for a, b in zip(jax.tree.leaves(d.params), jax.tree.leaves(exact.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_frozen_copies_loads_the_same_draft(target, tmp_path):
  d = draft_api.init_draft(target, "dspark", num_layers=2, block_size=4, target_layer_ids=(1, 3),
                           markov_rank=8)
  full = dj.save_draft(d, tmp_path / "full", dtype="float32")
  slim = dj.save_draft(d, tmp_path / "slim", dtype="float32", include_frozen=False)
  names = set(load_file(os.path.join(slim, "model.safetensors")))
  assert names == set(load_file(os.path.join(full, "model.safetensors"))) - {
      "embed_tokens.weight", "lm_head.weight"}
  a, b = dj.load_draft(full, target), dj.load_draft(slim, target)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  prefix = [3, 5, 7, 9]
  np.testing.assert_array_equal(dj.propose_block(target, a, prefix)[1],
                                dj.propose_block(target, b, prefix)[1])


def test_writes_deepspec_names_and_fields(target, tmp_path):
  d = draft_api.init_draft(target, "dspark", num_layers=2, block_size=7, target_layer_ids=(1, 3),
                           markov_rank=8)
  path = dj.save_draft(d, tmp_path / "d")
  cfg = json.load(open(os.path.join(path, "config.json")))
  assert cfg["architectures"] == ["Qwen3DSparkModel"]
  for key, value in dict(block_size=7, markov_rank=8, markov_head_type="vanilla",
                         enable_confidence_head=True, confidence_head_with_markov=True,
                         target_layer_ids=[1, 3], num_hidden_layers=2, num_target_layers=6,
                         tie_word_embeddings=False).items():
    assert cfg[key] == value, key
  tensors = load_file(os.path.join(path, "model.safetensors"))
  h, v, r = 32, 64, 8
  expect = {"fc.weight": (h, 2 * h), "hidden_norm.weight": (h,), "norm.weight": (h,),
            "embed_tokens.weight": (v, h), "lm_head.weight": (v, h),
            "markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r),
            "confidence_head.proj.weight": (1, h + r), "confidence_head.proj.bias": (1,),
            "layers.0.self_attn.q_proj.weight": (32, h), "layers.1.mlp.down_proj.weight": (h, 64)}
  for k, shape in expect.items():
    assert tensors[k].shape == shape, k
    assert tensors[k].dtype == ml_dtypes.bfloat16
  assert not any(k.startswith("model.") for k in tensors)
  # DFlash omits the heads and the head-only fields, as DeepSpec does.
  f = draft_api.init_draft(target, "dflash", num_layers=1, block_size=7, target_layer_ids=(1, 3))
  cfg = json.load(open(os.path.join(dj.save_draft(f, tmp_path / "f"), "config.json")))
  assert cfg["markov_rank"] == 0 and not cfg["enable_confidence_head"]
  assert "markov_head_type" not in cfg and "confidence_head_with_markov" not in cfg


def test_reads_a_deepspec_checkpoint_written_by_hand(target, tmp_path):
  """A checkpoint laid out exactly as DeepSpec's save_pretrained writes it (bf16, optional
  'model.' prefix tolerated), and algorithm detection from its config."""
  d = draft_api.init_draft(target, "dspark", num_layers=1, block_size=7, target_layer_ids=(1, 3),
                           markov_rank=8)
  path = dj.save_draft(d, tmp_path / "src")
  tensors = load_file(os.path.join(path, "model.safetensors"))
  out = tmp_path / "deepspec"
  out.mkdir()
  save_file({"model." + k if k.startswith("layers.0.mlp") else k: v for k, v in tensors.items()},
            str(out / "model.safetensors"), metadata={"format": "pt"})
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg.update(num_anchors=512, transformers_version="5.10.2")
  json.dump(cfg, open(out / "config.json", "w"))
  loaded = dj.load_draft(out, target)
  assert loaded.algorithm == "dspark" and loaded.config.markov_rank == 8
  w = np.asarray(loaded.module.markov_head.markov_w2.kernel[...])
  np.testing.assert_array_equal(w, tensors["markov_head.markov_w2.weight"].astype(np.float32).T)
  # DFlash is a DSparkModel with markov_rank 0 and no confidence head.
  cfg2 = dict(cfg, markov_rank=0, enable_confidence_head=False)
  assert config_from_json(cfg2).algorithm == "dflash"


def test_errors(target, tmp_path):
  d = draft_api.init_draft(target, "dspark", num_layers=1, block_size=4, target_layer_ids=(1, 3),
                           markov_rank=8)
  path = dj.save_draft(d, tmp_path / "d")
  other_vocab = tiny.random_target(tiny.tiny_config("qwen3", vocab=48, layers=6))
  with pytest.raises(dj.DraftConfigError, match="vocab size 64 != target vocab 48"):
    dj.load_draft(path, other_vocab)
  other_hidden = tiny.random_target(tiny.tiny_config("qwen3", vocab=64, hidden=16, layers=6,
                                                           head_dim=4))
  with pytest.raises(dj.DraftConfigError, match="hidden size"):
    dj.load_draft(path, other_hidden)
  shallow = tiny.random_target(tiny.tiny_config("qwen3", vocab=64, layers=3))
  with pytest.raises(dj.DraftConfigError, match=r"out of range|trained for a 6-layer"):
    dj.load_draft(path, shallow)
  with pytest.raises(dj.DraftConfigError, match="out of range"):
    draft_api.init_draft(target, "dspark", target_layer_ids=(1, 9))
  with pytest.raises(dj.DraftConfigError, match="unknown draft algorithm"):
    draft_api.init_draft(target, "medusa")
  cfg = json.load(open(os.path.join(path, "config.json")))
  bad = tmp_path / "bad"
  bad.mkdir()
  json.dump(dict(cfg, architectures=["Qwen3MedusaModel"]), open(bad / "config.json", "w"))
  with pytest.raises(dj.DraftConfigError, match="unknown draft architecture"):
    dj.load_draft(bad, target)
  # A missing tensor is named.
  tensors = load_file(os.path.join(path, "model.safetensors"))
  tensors.pop("layers.0.self_attn.k_norm.weight")
  miss = tmp_path / "miss"
  miss.mkdir()
  save_file(tensors, str(miss / "model.safetensors"))
  json.dump(cfg, open(miss / "config.json", "w"))
  with pytest.raises(dj.CheckpointMismatchError, match="layers.0.self_attn.k_norm.weight"):
    dj.load_draft(miss, target)
  with pytest.raises(dj.DraftConfigError, match="exceeds the trained block size 4"):
    dj.generate(target, [[1, 2, 3]], draft=d, num_draft_tokens=6, max_new_tokens=2)


# ---- the committed demo draft ----------------------------------------------------------------
def test_load_draft_demo_without_a_demo_target_is_one_clear_line(target):
  with pytest.raises(ValueError, match=r"draft 'demo' exists only for the demo target\(s\) "
                                       r"\['smollm2-135m-instruct'\]") as err:
    dj.load_draft("demo", target)
  assert "\n" not in str(err.value)


def test_load_draft_demo_resolves_the_committed_draft():
  """`load_draft("demo", <embedded SmolLM2>)` is the draft that serve and evaluate default to."""
  from dspark_jax import demo
  try:
    smollm2 = dj.load_target("smollm2-135m-instruct")
  except demo.DemoModelNotInstalledError as e:
    pytest.skip(f"demo model weights not installed: {e}")
  draft = dj.load_draft("demo", smollm2)
  assets = os.path.join(os.path.dirname(dj.__file__), "assets", "drafts")
  assert draft.path == os.path.join(assets, demo.DEMO_DRAFTS["smollm2-135m-instruct"])
  assert draft.algorithm == "dspark" and draft.target is smollm2
