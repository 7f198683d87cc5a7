"""Speculative generation on a device mesh gives exactly the tokens of the 1-device run.

Runs on 8 fake CPU devices (a subprocess, see `mesh_rig`): the target is loaded from a
checkpoint directory with `load_target(dir, mesh=...)`, the drafts with `load_draft` (which
shards them on the target's mesh), and `generate` runs the one jitted draft-verify program
over the mesh. Greedy and T = 1 (same seed) must match the 1-device tokens exactly: the
sharded program computes the same math, and the per-row sampling keys do not depend on the
layout. The compiled program is also checked for an all-gather of full-vocabulary logits
(sampling and acceptance should reduce over the vocab shards, not gather them).
"""

import json

import pytest

from mesh_rig import run_on_fake_devices

SCRIPT = """
import re
from flax import nnx
from dspark_jax.decoding import loop, speculative
from dspark_jax.decoding.cache import KVCache
from dspark_jax.engine import Engine
out, meshes, algos, check_hlo = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(","), sys.argv[4] == "1"
ckpt = os.path.join(out, "target")
dirs = write_drafts(write_checkpoint(ckpt), out)
VOCAB = 96  # distinct from every other dim of the rig (hidden 64, mlp 128), so greppable
PROMPTS = [[1, 5, 9, 3, 10, 7, 8, 2, 3, 4, 11], [4, 2, 9, 1, 0], [7, 7], [3, 1, 4, 1, 5, 9, 2],
           [6, 6, 1], [2, 8, 1, 8, 2, 8], [9, 9, 9, 9, 1, 2, 3, 4, 5], [11, 3]]  # 8 rows: data=8
hlo = {}
real = speculative.spec_generate
def keep_hlo(tgraph, tparams, dgraph, dparams, *args, **static):
  # Compiles the program generate runs (the engine calls this name) ahead of time, keeps its
  # text and runs that executable: one compilation, as without the hook.
  compiled = real.lower(tgraph, tparams, dgraph, dparams, *args, **static).compile()
  hlo["text"] = compiled.as_text()
  return compiled(tparams, dparams, *args)

def vocab_gathers(text):
  # all-gather results with a full-vocabulary dim, e.g. "f32[8,5,96]{2,1,0} all-gather("
  found = re.findall(r"= (\\w+\\[[\\d,]*\\])\\S* all-gather\\(", text)
  return sorted({s for s in found if str(VOCAB) in s[s.index("["):].strip("[]").split(",")})

def spec_mismatches(tree, want_tree):
  bad = []
  for x, want in zip(jax.tree.leaves(tree), jax.tree.leaves(want_tree)):
    if not x.sharding.is_equivalent_to(want, x.ndim):
      bad.append([list(x.shape), str(x.sharding.spec), str(want.spec)])
  return bad

res = {}
for spec in [None] + meshes:
  name = json.dumps(spec)
  mesh = sharding.make_mesh(spec)
  target = dj.load_target(ckpt, mesh=mesh)
  tp = {"/".join(map(str, p)): str(v.get_value().sharding.spec)
        for p, v in nnx.to_flat_state(target.params)}
  row = res[name] = dict(tokens={}, bad_params=spec_mismatches(
      target.params, sharding.state_shardings(target.params, mesh)), bad_cache=[],
      bad_lengths=[], bad_draft_state=[], vocab_gathers={}, specs={
          k: tp[k] for k in ("model/embed_tokens/embedding", "lm_head/kernel",
                             "model/layers/0/self_attn/q_proj/kernel",
                             "model/layers/0/self_attn/k_proj/kernel",
                             "model/layers/0/mlp/down_proj/kernel")})
  traces0 = loop.TRACE_COUNTS.get("spec_generate", 0)
  for algo in algos:
    draft = dj.load_draft(dirs[algo], target)
    row["bad_params"] += spec_mismatches(draft.params,
                                         sharding.state_shardings(draft.params, mesh))
    for temp in (0.0, 1.0):
      speculative.spec_generate = keep_hlo if (check_hlo and spec and temp == 1.0) else real
      got = dj.generate(target, PROMPTS, draft=draft, max_new_tokens=16, temperature=temp,
                        seed=3, stop_tokens=[])
      speculative.spec_generate = real
      row["tokens"][f"{algo}/{temp}"] = got.tokens
      if "text" in hlo:
        row["vocab_gathers"][algo] = vocab_gathers(hlo.pop("text"))
      # The buffers the run handed back to the pool keep the declared layouts, so the next
      # batch reuses them without a reshard or a recompilation.
      for key, bufs in Engine.for_target(target).pool._idle.items():
        for buf in bufs:
          if key[0] == "target":
            want = [sharding.cache_sharding(mesh, x.shape) for x in buf.k + buf.v]
            row["bad_cache"] += spec_mismatches(list(buf.k + buf.v), want)
            row["bad_lengths"] += spec_mismatches(
                buf.lengths, sharding.batch_sharding(mesh, buf.lengths.shape))
          else:
            row["bad_draft_state"] += spec_mismatches(buf, jax.tree.map(
                lambda x: x.shardings(mesh) if isinstance(x, KVCache) else
                sharding.batch_sharding(mesh, x.shape), buf,
                is_leaf=lambda x: isinstance(x, KVCache)))
  row["traces"] = loop.TRACE_COUNTS.get("spec_generate", 0) - traces0
result(res)
"""

ONE = json.dumps(None)
D2T4 = dict(data=2, tensor=4)


def _check(res, meshes, algos):
  one = res[ONE]["tokens"]
  assert sorted(one) == sorted(f"{a}/{t}" for a in algos for t in (0.0, 1.0))
  assert all(len(toks) == 8 and all(len(r) == 16 for r in toks) for toks in one.values())
  assert one[f"{algos[0]}/0.0"] != one[f"{algos[0]}/1.0"]  # T = 1 really sampled
  for spec in meshes:
    row = res[json.dumps(spec)]
    assert row["tokens"] == one, spec
    assert row["bad_params"] == [] and row["bad_cache"] == [], (spec, row)
    assert row["vocab_gathers"] == {a: [] for a in algos}, (spec, row["vocab_gathers"])
    # One jitted program per (draft, greedy or sampled), as on one device.
    assert row["traces"] == res[ONE]["traces"] == 2 * len(algos), (spec, row["traces"])
  return res


@pytest.fixture(scope="module")
def d2t4_run(tmp_path_factory):
  """(data=2, tensor=4), DSpark draft, greedy and T = 1: the CI-sized run (~15 s)."""
  return run_on_fake_devices(SCRIPT, tmp_path_factory.mktemp("d2t4"), json.dumps([D2T4]),
                             "dspark", "1")


def test_sharded_generate_matches_one_device(d2t4_run):
  res = _check(d2t4_run, [D2T4], ["dspark"])
  specs = res[json.dumps(D2T4)]["specs"]
  # The declared layout really splits: vocab and heads over tensor, kv heads (4) too.
  assert specs["model/embed_tokens/embedding"] == "P('tensor', None)"
  assert specs["lm_head/kernel"] == "P(None, 'tensor')"
  assert specs["model/layers/0/self_attn/q_proj/kernel"] == "P(None, 'tensor', None)"
  assert specs["model/layers/0/self_attn/k_proj/kernel"] == "P(None, 'tensor', None)"
  assert specs["model/layers/0/mlp/down_proj/kernel"] == "P('tensor', None)"


def test_decode_state_comes_back_in_its_declared_layout(d2t4_run):
  row = d2t4_run[json.dumps(D2T4)]
  assert row["bad_lengths"] == [] and row["bad_draft_state"] == [], row


@pytest.mark.slow
def test_sharded_generate_on_every_mesh_and_draft(tmp_path):
  """data=8, (data=2, tensor=4), tensor=8 x DSpark, Eagle3 x greedy, T = 1 (~1-2 min)."""
  meshes = [dict(data=8), D2T4, dict(tensor=8)]
  res = _check(run_on_fake_devices(SCRIPT, tmp_path, json.dumps(meshes), "dspark,eagle3", "1"),
               meshes, ["dspark", "eagle3"])
  # tensor=8 cannot split 4 kv heads: the rules replicate them (and the cache's heads).
  specs = res[json.dumps(dict(tensor=8))]["specs"]
  assert "tensor" not in specs["model/layers/0/self_attn/k_proj/kernel"]
  assert specs["model/layers/0/self_attn/q_proj/kernel"] == "P(None, 'tensor', None)"


SERVE_SCRIPT = """
import ml_collections
from configs import serve as serve_config
from dspark_jax.serving import app
from dspark_jax.engine.batcher import Request
out = sys.argv[1]
ckpt = os.path.join(out, "target")
dirs = write_drafts(write_checkpoint(ckpt), out)
PROMPTS = [[1, 5, 9, 3, 10, 7, 8, 2, 3, 4, 11], [4, 2, 9, 1, 0], [7, 7], [3, 1, 4, 1, 5, 9, 2],
           [6, 6, 1], [2, 8, 1, 8, 2, 8]]
res = {}
for mesh in (dict(data=1, fsdp=1, tensor=1), dict(data=2, fsdp=1, tensor=4)):
  # serve.py's own path: the config's mesh -> load_models -> make_batcher (batch and server
  # modes both decode through this batcher).
  config = serve_config.get_config()
  config.target, config.draft, config.scheduler, config.batch_size = ckpt, dirs["dspark"], "fixed", 4
  config.mesh = ml_collections.ConfigDict(mesh)
  target, draft = app.load_models(config)
  batcher = app.make_batcher(config, target, draft)
  reqs = [Request(prompt=p, max_new_tokens=12, stop_tokens=[], request_id=i,
                  temperature=(0.0 if i % 2 else 1.0)) for i, p in enumerate(PROMPTS)]
  batcher.run(reqs)
  res[json.dumps(mesh)] = dict(tokens=[r.tokens for r in reqs], devices=len(target.mesh.devices.flat),
                               embed=str(target.params["model"]["embed_tokens"]["embedding"].get_value().sharding.spec))
result(res)
"""


def test_serve_batcher_on_a_mesh_matches_one_device(tmp_path):
  """`serve.py --config.mesh.data=2 --config.mesh.tensor=4`: the serving batcher (6 mixed
  greedy / T = 1 requests through 4 slots) gives the 1-device tokens."""
  res = run_on_fake_devices(SERVE_SCRIPT, tmp_path)
  one, sharded = res[json.dumps(dict(data=1, fsdp=1, tensor=1))], res[json.dumps(
      dict(data=2, fsdp=1, tensor=4))]
  assert sharded["devices"] == 8 and one["devices"] == 1
  assert sharded["embed"] == "P('tensor', None)"
  assert all(len(t) == 12 for t in one["tokens"])
  assert sharded["tokens"] == one["tokens"]
