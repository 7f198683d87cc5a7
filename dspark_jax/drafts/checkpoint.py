"""Draft checkpoints in DeepSpec's HF format (config.json + model.safetensors), no torch.

DeepSpec saves drafts with `save_pretrained`: the config is a copy of the target's
(text) config plus draft fields, tensors carry no `model.` prefix, every Linear is
`[out, in]`, frozen copies of the target's `embed_tokens.weight` / `lm_head.weight` are
included, and everything is bfloat16. Algorithm detection follows DeepSpec's evaluator:
`*Eagle3Model` -> Eagle3; `*DSparkModel` -> DSpark, or DFlash when `markov_rank == 0`
and the confidence head is disabled.

dspark_jax extensions (ignored by DeepSpec): `dflash_layout: "original"` for the
original DFlash block (anchor + P masks), `sts_temperatures` for calibrated confidences.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import sharding as sharding_lib
from dspark_jax.checkpoints import hf as hf_ckpt
from dspark_jax.checkpoints.safetensors_io import TensorReader, save_tensors
from dspark_jax.config import FULL, ModelConfig
from dspark_jax.drafts import sts as sts_lib
from dspark_jax.drafts.api import Draft, build_module
from dspark_jax.drafts.config import DraftConfig, DraftConfigError, draft_layer_config

_FAMILY_PREFIX = {"qwen3": "Qwen3", "llama": "Llama", "gemma3": "Gemma3", "gemma4": "Gemma4"}
_FROZEN = ("embed_tokens.weight", "lm_head.weight")
_DRAFT_FIELDS = ("block_size", "mask_token_id", "target_layer_ids", "num_anchors",
                 "enable_confidence_head", "confidence_head_with_markov", "markov_rank",
                 "markov_head_type", "num_target_layers", "ttt_length", "step_loss_decay",
                 "draft_num_hidden_layers", "target_model_name_or_path", "target_model_type",
                 "target_text_model_type", "dflash_layout", "sts_temperatures",
                 "sts_prior", "draft_vocab_size")


def _text_config(hf: dict) -> dict:
  hf = copy.deepcopy(hf)
  if "text_config" in hf:
    text = hf["text_config"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      text.setdefault(key, hf.get(key))
    return text
  return hf


def detect_algorithm(cfg: dict) -> str:
  archs = cfg.get("architectures") or []
  arch = archs[0] if archs else ""
  if "Eagle3" in arch:
    return "eagle3"
  if "DSpark" in arch or "DFlash" in arch:
    dflash = int(cfg.get("markov_rank", 0) or 0) == 0 and not cfg.get("enable_confidence_head")
    return "dflash" if dflash or "DFlash" in arch else "dspark"
  raise DraftConfigError(
      f"unknown draft architecture {arch!r}: expected a DeepSpec *DSparkModel or *Eagle3Model "
      "config.json")


def config_from_json(cfg: dict) -> DraftConfig:
  """DraftConfig from a DeepSpec draft config.json."""
  algorithm = detect_algorithm(cfg)
  for key in ("target_layer_ids", "num_hidden_layers"):
    if key not in cfg:
      raise DraftConfigError(f"draft config.json lacks {key!r}")
  n = int(cfg["num_hidden_layers"])
  base = dict(cfg, layer_types=[FULL] * n)
  base.pop("per_layer_config", None)  # draft layers all take the global geometry
  layer = draft_layer_config(ModelConfig.from_hf_config(base), n)
  if algorithm == "eagle3":
    if "ttt_length" not in cfg:
      raise DraftConfigError("Eagle3 draft config.json lacks 'ttt_length'")
    block = int(cfg["ttt_length"])
  else:
    if "block_size" not in cfg:
      raise DraftConfigError("draft config.json lacks 'block_size'")
    block = int(cfg["block_size"])
  rank = int(cfg.get("markov_rank", 0) or 0) if algorithm == "dspark" else 0
  sts = cfg.get("sts_temperatures")
  prior = cfg.get("sts_prior")
  return DraftConfig(
      algorithm=algorithm, block_size=block, target_layer_ids=tuple(cfg["target_layer_ids"]),
      layer=layer, mask_token_id=int(cfg.get("mask_token_id", 0) or 0), markov_rank=rank,
      markov_head_type=cfg.get("markov_head_type", "vanilla") or "vanilla",
      confidence_head=bool(cfg.get("enable_confidence_head", False)) and algorithm == "dspark",
      confidence_with_markov=bool(cfg.get("confidence_head_with_markov", True)),
      anchor_first=cfg.get("dflash_layout", "anchor_first") != "original",
      sts_temperatures=tuple(sts) if sts else None,
      sts_prior=tuple(float(c) for c in prior) if prior else None,
      draft_vocab_size=int(cfg.get("draft_vocab_size", 0) or 0))


def config_to_json(draft: Draft, target_hf: dict, target_cfg: ModelConfig | None = None,
                   dtype: str = "bfloat16") -> dict:
  d = draft.config
  fam = d.layer.family
  cfg = _text_config(target_hf)
  for key in _DRAFT_FIELDS:
    cfg.pop(key, None)
  prefix = _FAMILY_PREFIX[fam]
  n = d.num_layers
  cfg.update(num_hidden_layers=n, layer_types=[FULL] * n, tie_word_embeddings=False,
             num_target_layers=(target_cfg.num_layers if target_cfg is not None
                                else cfg.get("num_target_layers")),
             target_layer_ids=list(d.target_layer_ids), dtype=dtype)
  cfg.pop("per_layer_config", None)
  if fam == "gemma4":
    cfg.setdefault("target_model_type", target_hf.get("model_type"))
    cfg.setdefault("target_text_model_type", cfg.get("model_type"))
    cfg["hidden_size_per_layer_input"] = 0
    cfg["num_kv_shared_layers"] = 0
    cfg["global_head_dim"] = d.layer.layer_head_dims[0]
    if d.layer.attention_k_eq_v:
      cfg["num_global_key_value_heads"] = d.layer.layer_kv_heads[0]
  if d.algorithm == "eagle3":
    cfg.update(architectures=[f"{prefix}Eagle3Model"], ttt_length=d.block_size,
               step_loss_decay=getattr(draft, "step_loss_decay", 0.8), draft_num_hidden_layers=n,
               target_model_name_or_path=getattr(draft, "target_name", None))
  else:
    cfg.update(architectures=[f"{prefix}DSparkModel"], block_size=d.block_size,
               mask_token_id=d.mask_token_id, num_anchors=getattr(draft, "num_anchors", 512),
               enable_confidence_head=d.confidence_head, markov_rank=d.markov_rank)
    if d.markov_rank:
      cfg["markov_head_type"] = d.markov_head_type
    if d.confidence_head:
      cfg["confidence_head_with_markov"] = d.confidence_with_markov
    if not d.anchor_first:
      cfg["dflash_layout"] = "original"
  if d.sts_temperatures is not None:
    cfg["sts_temperatures"] = list(d.sts_temperatures)
  if d.sts_prior is not None:
    cfg["sts_prior"] = list(d.sts_prior)
  if d.draft_vocab_size:  # the ids themselves are the `draft_vocab` tensor
    cfg["draft_vocab_size"] = d.draft_vocab_size
  return cfg


def save_draft(draft: Draft, path: str | os.PathLike, *, target=None, dtype: str | None = None,
               include_frozen: bool = True):
  """Writes `draft` as a DeepSpec-compatible HF directory.

  Args:
    draft: the draft.
    path: output directory (created; files are replaced atomically).
    target: the target (for its config and the frozen embedding / LM head copies);
      default: the target the draft was created or loaded with.
    dtype: tensor dtype on disk; default the dtype the draft was loaded from, else bfloat16
      (DeepSpec's).
    include_frozen: write the frozen copies of the target's embedding and LM head, as
      DeepSpec does. dspark_jax never reads them (the draft uses the target's own), so
      False saves `2 * V * D` values per draft (the committed demo draft does this).
  """
  target = target if target is not None else getattr(draft, "target", None)
  if target is None or getattr(target, "hf_config", None) is None:
    raise ValueError("save_draft needs the target (with its HF config): pass target=")
  dtype = dtype or getattr(draft, "source_dtype", None) or "bfloat16"
  np_dtype = {"bfloat16": jnp.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
  tensors = hf_ckpt.export_state(draft.module)
  tmodel = target.model
  if include_frozen:
    emb = np.asarray(jax.device_get(tmodel.model.embed_tokens.embedding[...]))
    tensors["embed_tokens.weight"] = emb
    tensors["lm_head.weight"] = (emb if tmodel.lm_head is None else
                                 np.asarray(jax.device_get(tmodel.lm_head.kernel[...])).T)
  # Integer tensors (the draft vocabulary's token ids) keep their dtype: bf16 holds only
  # 8 significant bits and would merge ids above 256.
  tensors = {k: np.asarray(v) if np.issubdtype(np.asarray(v).dtype, np.integer)
             else np.asarray(v).astype(np_dtype) for k, v in tensors.items()}
  cfg = config_to_json(draft, target.hf_config, target.config, dtype)
  path = os.fspath(path)
  tmp = path.rstrip("/") + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  save_tensors(tensors, tmp)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  _carry_sts(draft, path, tmp)
  if os.path.exists(path):
    import shutil
    shutil.rmtree(path)
  os.replace(tmp, path)
  return path


def _carry_sts(draft: Draft, path: str, tmp: str) -> None:
  """Copies `sts.json` (and `reliability.png`) into the new directory `tmp` when the file still
  holds the draft's temperatures, so re-saving a calibrated draft keeps its calibration record
  (`save_draft` replaces the whole directory). config.json carries the temperatures anyway."""
  temps = draft.config.sts_temperatures
  if temps is None:
    return
  for src in dict.fromkeys(filter(None, (getattr(draft, "path", None), path))):
    try:
      found = sts_lib.read_sts(src) if os.path.isdir(src) else None
    except ValueError:
      continue  # a malformed record is not carried over
    if found is not None and np.allclose(found, temps, rtol=0, atol=1e-12):
      for name in (sts_lib.STS_FILE, "reliability.png"):
        if os.path.exists(os.path.join(src, name)):
          shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
      return


def load_draft(path: str | os.PathLike, target, *, dtype=None, mesh=None) -> Draft:
  """Reads a DeepSpec (or dspark_jax) draft directory for `target`.

  The params are sharded over `mesh` by the logical-axis rules (default: the target's mesh,
  so the draft and the target meet in one jitted program on the same devices).

  `path="demo"` loads the committed demo draft of the embedded demo target
  (`dspark_jax/assets/drafts/`, see `dspark_jax.demo.DEMO_DRAFTS`).

  Raises:
    ValueError: `path="demo"` for a target that has no demo draft.
    DraftConfigError: unknown algorithm/architecture, vocab/hidden mismatch with the target,
      tapped layer ids out of range, or a trained-for-another-depth target.
    CheckpointMismatchError: missing/unexpected/mis-shaped tensors (all named).
  """
  path = resolve_draft_path(path, target)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in draft directory {path!r}")
  with open(cfg_path) as f:
    cfg = json.load(f)
  dcfg = config_from_json(cfg)
  temps = sts_lib.read_sts(path)  # `python -m dspark_jax.calibrate`; wins over config.json
  if temps is not None:
    if len(temps) != dcfg.block_size:
      raise DraftConfigError(f"{sts_lib.sts_path(path)} has {len(temps)} temperatures; the "
                             f"draft's block_size is {dcfg.block_size}")
    prior = sts_lib.read_sts_prior(path)
    if prior is not None and len(prior) != dcfg.block_size:
      raise DraftConfigError(f"{sts_lib.sts_path(path)} has {len(prior)} prior confidences; "
                             f"the draft's block_size is {dcfg.block_size}")
    dcfg = dataclasses.replace(dcfg, sts_temperatures=temps, sts_prior=prior)
  dcfg.check_target(target.config)
  ntl = cfg.get("num_target_layers")
  if ntl is not None and int(ntl) != target.config.num_layers:
    raise DraftConfigError(f"draft was trained for a {ntl}-layer target; this target has "
                           f"{target.config.num_layers} layers")
  dtype = dtype or target.dtype
  abstract = nnx.eval_shape(lambda: build_module(dcfg, dtype))
  reader = TensorReader(path).rename(lambda k: k[len("model."):] if k.startswith("model.") else k)
  try:
    for name in _FROZEN:
      if name in reader and reader.shape(name) != (target.config.vocab_size,
                                                   target.config.hidden_size):
        raise DraftConfigError(f"{name} has shape {reader.shape(name)}; the target needs "
                               f"({target.config.vocab_size}, {target.config.hidden_size})")
    source_dtype = str(reader.get(reader.keys()[0]).dtype) if reader.keys() else None
    mesh = mesh if mesh is not None else getattr(target, "mesh", None)
    shardings = (None if mesh is None else
                 sharding_lib.state_shardings(nnx.state(abstract), mesh))
    module = hf_ckpt.load_into(abstract, path, dtype=dtype, reader=reader, shardings=shardings,
                               ignore=[r"embed_tokens\.weight", r"lm_head\.weight"])
  finally:
    reader.close()
  draft = Draft(dcfg, module, dtype=dtype, path=path)
  draft.source_dtype = source_dtype if source_dtype in ("bfloat16", "float32",
                                                        "float16") else None
  draft.target = target
  draft.num_anchors = cfg.get("num_anchors", 512)
  draft.step_loss_decay = cfg.get("step_loss_decay", 0.8)
  draft.target_name = cfg.get("target_model_name_or_path")
  return draft


def resolve_draft_path(path: str | os.PathLike, target) -> str:
  """`"demo"` -> the committed demo draft of the demo target; otherwise `path` itself.

  Raises:
    ValueError: "demo" for a target without a demo draft (a one-line message naming those
      that have one).
  """
  path = os.fspath(path)
  if path == "demo":
    from dspark_jax import demo  # lazy: the demo package is not part of the library proper
    return demo.demo_draft_dir(target)
  return path
