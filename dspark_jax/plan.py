"""Memory planner: per-device bytes of speculative inference on a device mesh, before loading.

  python -m dspark_jax.plan --config=configs/qwen3_8b.py --devices=8 --batch=64 --max_len=4096

prints, for one device of a `(data, fsdp, tensor)` mesh, the bytes of

  * target params: `jax.eval_shape` of the target model, each variable sharded by the
    logical-axis rules of `dspark_jax.sharding` (what `load_target(..., mesh=)` places);
  * draft params: the same for the draft module of the run config's draft recipe
    (what `init_draft` / `load_draft` place on the target's mesh);
  * KV cache: `KVCache.init` of `batch` rows x `max_len` slots, K/V sharded by
    `sharding.cache_sharding`, lengths over the row axes (`KVCache.place`, what the
    engine allocates);
  * draft cache: the draft runtime's state (context K/V; Eagle3 adds a hidden row),
    laid out like the target's cache (rows over data, kv heads over tensor);
  * activations: an analytic estimate (no compilation) of the largest transient of one
    program: the prefill of `batch` prompts of `prompt_len` tokens (attention scores over the
    whole prompt, every row at once, as `loop.prefill` runs it), a verify round
    (`block_size + 1` tokens per row over `max_len` cache slots, full-vocabulary logits) and
    a propose call. It assumes activations are sharded like the weights they come from
    (batch over data x fsdp, heads / MLP / vocab over tensor) and counts 10 bytes per
    attention score (float32 scores, their float32 exp, a compute-dtype copy), so it is an
    upper estimate of what XLA keeps live (1.3-1.4x CPU XLA's temporaries on the test rig,
    `tests/test_plan.py`); a fused attention kernel would remove the score term.

and whether their sum fits `--hbm_gib` (a number or a preset: v5e = 16, h100 = 80; default:
both presets). `--json=FILE` writes the same numbers. Nothing is allocated: the geometry
comes from the run config's target (a local HF directory's config.json, or one of the
architectures known below for the configs' hub ids) and the mesh is abstract, so a laptop
plans an 8-chip run. Several comma-separated `--config` files print one markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from dspark_jax import cli, run_config
from dspark_jax import sharding as sharding_lib
from dspark_jax.config import ModelConfig
from dspark_jax.decoding.cache import KVCache
from dspark_jax.drafts import api as draft_api
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.models import transformer
from dspark_jax.target import resolve_dtype

GIB = 1 << 30
HBM_PRESETS_GIB = {"v5e": 16.0, "h100": 80.0}

# The released text geometries of the configs' targets (their config.json), so the planner
# runs offline. Qwen3 values are the published config.json files (also pinned against
# transformers' parameter counts in tests/test_models.py). Gemma 4 12B: the geometry
# third-party write-ups report for google/gemma-4-12B-it (48 layers in a 5:1 sliding/full
# pattern, 3840 wide, 16 query heads, 8 kv heads on sliding layers and 1 K=V head of dim 512
# on full layers, MLP 15360, tied embeddings, no per-layer embeddings); not read from the
# checkpoint here, so its row is only as good as those reports.
_S, _F = "sliding_attention", "full_attention"
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    **{name: dict(model_type="qwen3", vocab_size=151936, hidden_size=hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                  head_dim=128, intermediate_size=inter, hidden_act="silu", rms_norm_eps=1e-6,
                  rope_theta=1_000_000, max_position_embeddings=40960,
                  tie_word_embeddings=tied, bos_token_id=151643, eos_token_id=151645)
       for name, (hidden, layers, heads, inter, tied) in {
           "Qwen/Qwen3-4B": (2560, 36, 32, 9728, True),
           "Qwen/Qwen3-8B": (4096, 36, 32, 12288, False),
           "Qwen/Qwen3-14B": (5120, 40, 40, 17408, False)}.items()},
    "google/gemma-4-12B-it": dict(
        model_type="gemma4_text", vocab_size=262144, hidden_size=3840, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        attention_k_eq_v=True, num_global_key_value_heads=1, intermediate_size=15360,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, sliding_window=1024,
        final_logit_softcapping=30.0, tie_word_embeddings=True, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, enable_moe_block=False, max_position_embeddings=131072,
        layer_types=([_S] * 5 + [_F]) * 8,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "rope_theta": 1_000_000.0,
                               "partial_rotary_factor": 0.25}}),
}


def target_config(target: str) -> ModelConfig:
  """ModelConfig of a run config's `target`: a local HF directory or a known hub id.

  Raises:
    ValueError: neither (the message names the known ids).
  """
  for candidate in (target, cli.repo_path(target)):
    cfg_file = os.path.join(candidate, "config.json")
    if os.path.isfile(cfg_file):
      with open(cfg_file) as f:
        return ModelConfig.from_hf_config(json.load(f))
  if target in KNOWN_ARCHITECTURES:
    return ModelConfig.from_hf_config(KNOWN_ARCHITECTURES[target])
  raise ValueError(f"cannot plan for target {target!r}: not a directory with a config.json and "
                   f"not one of the known architectures {sorted(KNOWN_ARCHITECTURES)}")


# ---------------------------------------------------------------------------------------------
# Per-device bytes of sharded arrays
# ---------------------------------------------------------------------------------------------
def mesh_shape(devices: int, spec: str | Mapping[str, int] | None = None) -> dict[str, int]:
  """`{data, fsdp, tensor}` sizes: `spec` ("data=2,tensor=4", one entry may be -1) or, by
  default, every device on the tensor axis (weights split 8 ways, the batch not split)."""
  if not spec:
    spec = {"tensor": -1}
  if isinstance(spec, str):
    pairs = [p.split("=") for p in spec.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"mesh {spec!r}: expected name=size,... e.g. data=2,tensor=4")
    spec = {k.strip(): int(v) for k, v in pairs}
  dims = dict(zip(sharding_lib.MESH_AXES, sharding_lib.mesh_dims(spec, devices)))
  if math.prod(dims.values()) != devices:
    raise ValueError(f"mesh {dims} has {math.prod(dims.values())} devices, not {devices}")
  return dims


def abstract_mesh(dims: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """A device-free mesh with the same axis sizes (the sharding rules read only sizes)."""
  return jax.sharding.AbstractMesh(tuple(dims[a] for a in sharding_lib.MESH_AXES),
                                   sharding_lib.MESH_AXES)


def shard_bytes(shape: Sequence[int], dtype, spec: jax.sharding.PartitionSpec,
                dims: Mapping[str, int]) -> int:
  """Bytes one device holds of an array of `shape` laid out as `spec` on a mesh of `dims`.

  Every device of a NamedSharding holds one shard (replicated axes repeat it), so this is
  the same on every device.
  """
  shard = list(shape)
  for i, entry in enumerate(tuple(spec)[:len(shape)]):
    if entry is None:
      continue
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    shard[i] = -(-shard[i] // math.prod(dims[n] for n in names))  # ceil, as jax pads
  return math.prod(shard) * jnp.dtype(dtype).itemsize


def state_bytes(state: nnx.State, dims: Mapping[str, int],
                rules=sharding_lib.DEFAULT_RULES) -> int:
  """Per-device bytes of an abstract NNX state sharded by `sharding.state_shardings`."""
  shardings = sharding_lib.state_shardings(state, abstract_mesh(dims), rules)
  leaves = jax.tree.leaves(state)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  return sum(shard_bytes(x.shape, x.dtype, s, dims) for x, s in zip(leaves, specs))


def _kv_bytes(cache: KVCache, dims: Mapping[str, int], rules) -> int:
  """Per-device bytes of an abstract `KVCache` laid out as `KVCache.place` lays it out."""
  mesh = abstract_mesh(dims)
  total = shard_bytes(cache.lengths.shape, cache.lengths.dtype,
                      sharding_lib.batch_sharding(mesh, cache.lengths.shape, rules).spec, dims)
  for keys, entries in ((True, cache.k), (False, cache.v)):
    for x in entries:
      spec = sharding_lib.cache_sharding(mesh, x.shape, rules, keys=keys).spec
      total += shard_bytes(x.shape, x.dtype, spec, dims)
  return total


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype, dims: Mapping[str, int],
                rules=sharding_lib.DEFAULT_RULES) -> int:
  """Per-device bytes of the target KV cache as the engine places it."""
  return _kv_bytes(jax.eval_shape(lambda: KVCache.init(cfg, batch, capacity, dtype)), dims, rules)


def draft_state_bytes(dcfg: DraftConfig, batch: int, capacity: int, dtype,
                      dims: Mapping[str, int] | None = None,
                      rules=sharding_lib.DEFAULT_RULES) -> int:
  """Per-device bytes of the draft runtime state as the engine places it: its caches like
  the target's, other per-row state (Eagle3's hidden seed) split over the row axes."""
  if dcfg.algorithm == "eagle3":
    from dspark_jax.drafts.eagle3 import Eagle3Runtime as runtime
  else:
    from dspark_jax.drafts.runtime import ParallelRuntime as runtime
  dims = dims or {a: 1 for a in sharding_lib.MESH_AXES}
  mesh = abstract_mesh(dims)
  state = jax.eval_shape(lambda: runtime.init_state(dcfg, batch, capacity, dtype))
  total = 0
  for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, KVCache)):
    total += (_kv_bytes(x, dims, rules) if isinstance(x, KVCache) else
              shard_bytes(x.shape, x.dtype, sharding_lib.batch_sharding(mesh, x.shape, rules).spec,
                          dims))
  return total


# ---------------------------------------------------------------------------------------------
# Activation estimate
# ---------------------------------------------------------------------------------------------
def _act(shape: Sequence[int], axes: Sequence[str | None], nbytes: int,
         dims: Mapping[str, int], rules) -> int:
  """Per-device bytes of a transient with logical `axes` (sharded by the same rules)."""
  spec = sharding_lib.spec_for(axes, shape, abstract_mesh(dims), rules)
  return shard_bytes(shape, jnp.float32, spec, dims) // 4 * nbytes


def _attention_bytes(b: int, t: int, s: int, heads: int, kv_heads: int, head_dim: int,
                     itemsize: int, dims, rules) -> int:
  """One attention call: float32 scores counted 3x (scores, exp, cast copy: 4 + 4 + 2 bytes
  per score), plus q, new k/v and the output in the compute dtype."""
  scores = _act((b, heads, t, s), ("batch", "heads", None, None), 10, dims, rules)
  qo = 2 * _act((b, t, heads, head_dim), ("batch", None, "heads", "head_dim"), itemsize, dims,
                rules)
  kv = 2 * _act((b, t, kv_heads, head_dim), ("batch", None, "kv_heads", "head_dim"), itemsize,
                dims, rules)
  return scores + qo + kv


def _decoder_peak(cfg: ModelConfig, b: int, t: int, s: int, itemsize: int, dims, rules) -> int:
  """Largest single-layer transient of `cfg`'s decoder on `t` queries over `s` keys, plus the
  residual stream (input, normed copy, layer output) that lives beside it."""
  resid = 3 * _act((b, t, cfg.hidden_size), ("batch", None, "embed"), itemsize, dims, rules)
  peak = 0
  for i in range(cfg.num_layers):
    attn = _attention_bytes(b, t, s, cfg.num_heads, cfg.layer_kv_heads[i],
                            cfg.layer_head_dims[i], itemsize, dims, rules)
    mlp = 3 * _act((b, t, cfg.mlp_dim_for(i)), ("batch", None, "mlp"), itemsize, dims, rules)
    peak = max(peak, attn, mlp)
  return resid + peak


def _logits_bytes(b: int, t: int, vocab: int, copies: int, dims, rules) -> int:
  return copies * _act((b, t, vocab), ("batch", None, "vocab"), 4, dims, rules)


def activation_bytes(cfg: ModelConfig, dcfg: DraftConfig, batch: int, capacity: int,
                     prompt_len: int, dtype, dims: Mapping[str, int],
                     rules=sharding_lib.DEFAULT_RULES) -> dict[str, int]:
  """Per-device transient bytes of the three phases of a speculative run (see module doc).

  Returns:
    {"prefill", "verify", "propose"} bytes; the peak is their max.
  """
  item = jnp.dtype(dtype).itemsize
  p = dcfg.block_size
  taps = _act((batch, prompt_len, dcfg.context_dim), ("batch", None, None), item, dims, rules)
  prefill = (_decoder_peak(cfg, batch, prompt_len, prompt_len, item, dims, rules) + taps
             + _logits_bytes(batch, 1, cfg.vocab_size, 2, dims, rules))
  # Verify: P + 1 tokens per row attend over the whole cache; logits and their softmax.
  verify = (_decoder_peak(cfg, batch, p + 1, capacity, item, dims, rules)
            + _logits_bytes(batch, p + 1, cfg.vocab_size, 2, dims, rules))
  # Propose: the draft block attends over its context cache and itself; base logits, the
  # sequential head's corrected logits and the sampling probabilities.
  vocab = dcfg.draft_vocab_size or cfg.vocab_size
  propose = (_decoder_peak(dcfg.layer, batch, dcfg.block_inputs, capacity + dcfg.block_inputs,
                           item, dims, rules)
             + _logits_bytes(batch, p, vocab, 3, dims, rules))
  return {"prefill": prefill, "verify": verify, "propose": propose}


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes (every device of the mesh holds the same amount)."""

  mesh: dict[str, int]
  batch: int
  max_len: int
  prompt_len: int
  dtype: str
  params: int
  draft_params: int
  kv_cache: int
  draft_cache: int
  activations: dict[str, int]

  @property
  def peak_activations(self) -> int:
    return max(self.activations.values())

  @property
  def total(self) -> int:
    return (self.params + self.draft_params + self.kv_cache + self.draft_cache
            + self.peak_activations)

  def fits(self, hbm_gib: float) -> bool:
    return self.total <= hbm_gib * GIB

  def to_json(self, hbm: Mapping[str, float]) -> dict:
    out = dataclasses.asdict(self)
    out.update(peak_activations=self.peak_activations, total=self.total,
               fits={name: self.fits(gib) for name, gib in hbm.items()},
               hbm_gib=dict(hbm))
    return out


def plan(cfg: ModelConfig, dcfg: DraftConfig, *, dims: Mapping[str, int], batch: int,
         max_len: int, prompt_len: int | None = None, dtype="bfloat16",
         draft_dtype=None, rules=sharding_lib.DEFAULT_RULES) -> MemoryPlan:
  """Per-device memory of serving `batch` rows of `max_len` cache slots on mesh `dims`.

  Args:
    cfg, dcfg: target and draft geometry.
    dims: mesh axis sizes `{data, fsdp, tensor}`.
    batch: rows per program (B).
    max_len: cache slots per row (S: prompt + new tokens + the block's slack).
    prompt_len: prompt tokens per row in the prefill (default `max_len // 2`).
    dtype: target params, cache and activations; `draft_dtype` the draft's (default same).
  """
  dims = {a: int(dims.get(a, 1)) for a in sharding_lib.MESH_AXES}
  jdtype = resolve_dtype(dtype)
  ddtype = resolve_dtype(draft_dtype) if draft_dtype is not None else jdtype
  prompt_len = max_len // 2 if prompt_len is None else prompt_len
  if not 1 <= prompt_len <= max_len:
    raise ValueError(f"prompt_len must be in [1, max_len={max_len}], got {prompt_len}")
  target_state = nnx.state(transformer.abstract_model(cfg, jdtype))
  draft_state = nnx.state(nnx.eval_shape(lambda: draft_api.build_module(dcfg, ddtype)))
  return MemoryPlan(
      mesh=dims, batch=batch, max_len=max_len, prompt_len=prompt_len,
      dtype=jnp.dtype(jdtype).name,
      params=state_bytes(target_state, dims, rules),
      draft_params=state_bytes(draft_state, dims, rules),
      kv_cache=cache_bytes(cfg, batch, max_len, jdtype, dims, rules),
      draft_cache=draft_state_bytes(dcfg, batch, max_len, ddtype, dims, rules),
      activations=activation_bytes(cfg, dcfg, batch, max_len, prompt_len, jdtype, dims, rules))


def plan_run_config(config, *, devices: int, mesh: str | Mapping[str, int] | None, batch: int,
                    max_len: int, prompt_len: int | None = None, dtype="bfloat16") -> MemoryPlan:
  """`plan` for a training/run config (`configs/*.py`): its target and draft recipe."""
  from dspark_jax.training.driver import build_draft_config  # the recipe -> DraftConfig
  cfg = target_config(config.target)
  return plan(cfg, build_draft_config(config, cfg), dims=mesh_shape(devices, mesh), batch=batch,
              max_len=max_len, prompt_len=prompt_len, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
FLAGS = flags.FlagValues()  # this tool's own (see dspark_jax.cli)
flags.DEFINE_list("config", [os.path.join("configs", "qwen3_8b.py")],
                  "run configs (configs/*.py, comma-separated) naming the target and the draft "
                  "recipe, relative to the repository root; several print a markdown table",
                  flag_values=FLAGS)
flags.DEFINE_string("target", "", "override the config's target (HF dir or known hub id)",
                    flag_values=FLAGS)
flags.DEFINE_string("algorithm", "", "override the config's draft algorithm", flag_values=FLAGS)
flags.DEFINE_integer("devices", 8, "devices in the mesh", flag_values=FLAGS)
flags.DEFINE_string("mesh", "", "mesh axis sizes, e.g. data=2,tensor=4 (one may be -1); default "
                    "tensor=<devices>", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "rows per program", flag_values=FLAGS)
flags.DEFINE_integer("max_len", 4096, "cache slots per row (prompt + new tokens + block)",
                     flag_values=FLAGS)
flags.DEFINE_integer("prompt_len", 0, "prompt tokens per row in the prefill (0: max_len / 2)",
                     flag_values=FLAGS)
flags.DEFINE_string("dtype", "bfloat16", "params / cache / activation dtype", flag_values=FLAGS)
flags.DEFINE_string("hbm_gib", "", "HBM per device: GiB or a preset (v5e = 16, h100 = 80); "
                    "default: both presets", flag_values=FLAGS)
flags.DEFINE_string("json", "", "also write the plan as JSON here (relative to the repository "
                    "root)", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an existing --json file", flag_values=FLAGS)


def hbm_sizes(spec: str) -> dict[str, float]:
  """`{name: GiB}` of `--hbm_gib`: "" = every preset, a preset name, or a number."""
  if not spec:
    return dict(HBM_PRESETS_GIB)
  if spec.lower() in HBM_PRESETS_GIB:
    return {spec.lower(): HBM_PRESETS_GIB[spec.lower()]}
  try:
    return {f"{float(spec):g} GiB": float(spec)}
  except ValueError:
    raise SystemExit(f"error: --hbm_gib={spec!r} is neither a number nor one of "
                     f"{sorted(HBM_PRESETS_GIB)}") from None


def format_plan(p: MemoryPlan, hbm: Mapping[str, float], title: str = "") -> str:
  gib = lambda n: f"{n / GIB:8.2f} GiB"
  mesh = ", ".join(f"{a}={n}" for a, n in p.mesh.items())
  lines = [f"{title}mesh ({mesh}), batch {p.batch}, max_len {p.max_len}, prompt_len "
           f"{p.prompt_len}, {p.dtype}; per device:",
           f"  target params  {gib(p.params)}",
           f"  draft params   {gib(p.draft_params)}",
           f"  KV cache       {gib(p.kv_cache)}",
           f"  draft cache    {gib(p.draft_cache)}",
           "  activations    " + gib(p.peak_activations) + "  (estimate; prefill "
           + ", verify ".join(f"{p.activations[k] / GIB:.2f}" for k in ("prefill", "verify"))
           + f", propose {p.activations['propose'] / GIB:.2f} GiB)",
           f"  total          {gib(p.total)}"]
  for name, size in hbm.items():
    verdict = "fits" if p.fits(size) else "does NOT fit"
    lines.append(f"  {name} ({size:g} GiB HBM): {verdict}")
  return "\n".join(lines)


def markdown_table(rows: Sequence[tuple[str, MemoryPlan]], hbm: Mapping[str, float]) -> str:
  """One row per (target, plan): GiB per device of each part, and whether each HBM fits."""
  head = ["target", "params", "draft", "KV cache", "draft cache", "activations", "total"]
  head += [f"fits {name} ({gib:g} GiB)" for name, gib in hbm.items()]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, p in rows:
    cells = [name] + [f"{n / GIB:.2f}" for n in (p.params, p.draft_params, p.kv_cache,
                                                 p.draft_cache, p.peak_activations, p.total)]
    cells += ["yes" if p.fits(gib) else "no" for gib in hbm.values()]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[MemoryPlan]:
  a = cli.parse(FLAGS, argv, __doc__)
  out = cli.repo_path(a.json) if a.json else None
  if out:
    cli.check_outputs([out], a.overwrite)
  hbm = hbm_sizes(a.hbm_gib)
  rows, records = [], []
  for config_file in a.config:
    config = run_config.load_config_file(cli.repo_path(config_file))
    if a.target:
      config.target = a.target
    if a.algorithm:
      config.algorithm = a.algorithm
    try:
      p = plan_run_config(config, devices=a.devices, mesh=a.mesh or None, batch=a.batch,
                          max_len=a.max_len, prompt_len=a.prompt_len or None, dtype=a.dtype)
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    print(format_plan(p, hbm, f"{config.target} + {config.algorithm} draft: "))
    rows.append((config.target, p))
    records.append(dict(p.to_json(hbm), target=config.target, algorithm=config.algorithm,
                        config=config_file))
  if len(rows) > 1:
    print("\n" + markdown_table(rows, hbm))
  if out:
    cli.write_json(out, {"plans": records})
  return [p for _, p in rows]


if __name__ == "__main__":
  main()
