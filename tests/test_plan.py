"""The memory planner (`dspark_jax.plan`) predicts the bytes each device really holds."""

import json
import math

import pytest

from dspark_jax import plan
from dspark_jax.drafts import api as draft_api
from dspark_jax.models import transformer
from mesh_rig import run_on_fake_devices

MESHES = [dict(data=1), dict(data=8), dict(data=2, tensor=4), dict(tensor=8),
          dict(fsdp=2, tensor=4)]

# On 8 fake devices: the real arrays (load_target / load_draft on the mesh, the engine's
# cache and draft-state buffers) against the plan, device by device.
ACTUAL_SCRIPT = """
from dspark_jax import plan
from dspark_jax.engine import Engine
out, meshes = sys.argv[1], json.loads(sys.argv[2])
batch, capacity = 8, 24
ckpt = os.path.join(out, "target")
dirs = write_drafts(write_checkpoint(ckpt), out)
rows = []
for spec in meshes:
  mesh = sharding.make_mesh(spec)
  target = dj.load_target(ckpt, mesh=mesh)
  engine = Engine.for_target(target)
  _, cache = engine._cache(batch, capacity)
  for algo, path in dirs.items():
    draft = dj.load_draft(path, target)
    _, dstate = engine._draft_state(draft, batch, capacity)
    want = plan.plan(target.config, draft.config, dims=dict(mesh.shape), batch=batch,
                     max_len=capacity, dtype="float32")
    for dev in mesh.devices.flat:
      rows.append(dict(mesh=spec, algo=algo, device=dev.id,
                       actual=[per_device_bytes(target.params, dev),
                               per_device_bytes(draft.params, dev),
                               per_device_bytes(cache, dev), per_device_bytes(dstate, dev)],
                       planned=[want.params, want.draft_params, want.kv_cache,
                                want.draft_cache]))
    devices_used = {d.id for d in mesh.devices.flat}
    rows.append(dict(unused=[per_device_bytes(target.params, d) for d in jax.devices()
                             if d.id not in devices_used]))
result(rows)
"""


def test_planned_bytes_equal_actual_per_device_bytes(tmp_path):
  rows = run_on_fake_devices(ACTUAL_SCRIPT, tmp_path, json.dumps(MESHES), timeout=300)
  checked = [r for r in rows if "actual" in r]
  assert len(checked) == 2 * sum(math.prod(m.values()) for m in MESHES)
  for r in checked:
    assert r["actual"] == r["planned"], r
  # A 1-device mesh leaves the other fake devices empty (nothing replicated there by accident).
  assert all(not any(r["unused"]) for r in rows if "unused" in r)
  # The meshes really split the params: tensor=8 holds less per device than one device does.
  one = next(r["actual"][0] for r in checked if r["mesh"] == dict(data=1))
  t8 = next(r["actual"][0] for r in checked if r["mesh"] == dict(tensor=8))
  assert t8 < one / 3


def _qwen3_8b(**kw):
  return plan.plan(plan.target_config("Qwen/Qwen3-8B"),
                   draft_api.make_config(plan.target_config("Qwen/Qwen3-8B"), "dspark"),
                   batch=64, max_len=4096, **kw)


def test_full_size_numbers_follow_from_the_geometry():
  p = _qwen3_8b(dims=plan.mesh_shape(8))
  assert p.mesh == dict(data=1, fsdp=1, tensor=8)
  # 36 layers x (K, V) x 64 rows x 8 kv heads x 4096 slots x 128 dims x 2 bytes, 8 ways.
  assert p.kv_cache == 36 * 2 * 64 * 8 * 4096 * 128 * 2 // 8 + 64 * 4
  # The draft's context cache is laid out the same way (its 8 kv heads split 8 ways).
  dcfg = draft_api.make_config(plan.target_config("Qwen/Qwen3-8B"), "dspark").layer
  assert p.draft_cache == (dcfg.num_layers * 2 * 64 * dcfg.num_kv_heads * 4096
                           * dcfg.head_dim * 2 // 8 + 64 * 4)
  # 8.19e9 bf16 params split 8 ways, up to the replicated norms (< 0.1 %).
  n = transformer.count_params(plan.target_config("Qwen/Qwen3-8B"))
  assert abs(p.params - n * 2 / 8) / p.params < 1e-3
  # Data parallelism does not split the weights; it splits the cache's batch.
  d = _qwen3_8b(dims=plan.mesh_shape(8, "data=8"))
  # K/V are split 8 ways either way (rows or kv heads); the lengths only by rows.
  lengths = 64 * 4
  assert d.params == pytest.approx(8 * p.params, rel=1e-3)
  assert d.kv_cache == p.kv_cache - lengths + lengths // 8
  assert d.draft_cache == p.draft_cache - lengths + lengths // 8
  assert p.peak_activations == max(p.activations.values()) == p.activations["prefill"]
  assert p.fits(80) and not p.fits(16)


def test_cli_prints_and_writes_json(tmp_path, capsys):
  out = tmp_path / "plan.json"
  [p] = plan.main(["--config=configs/qwen3_8b.py", "--devices=8", "--batch=64", "--max_len=4096",
                 "--hbm_gib=v5e", f"--json={out}"])
  text = capsys.readouterr().out
  assert "Qwen/Qwen3-8B" in text and "v5e (16 GiB HBM): does NOT fit" in text
  [saved] = json.loads(out.read_text())["plans"]
  assert saved["total"] == p.total and saved["fits"] == {"v5e": False}
  assert saved["kv_cache"] == p.kv_cache and saved["mesh"] == dict(data=1, fsdp=1, tensor=8)
  with pytest.raises(SystemExit, match="exists"):
    plan.main([f"--json={out}"])
  with pytest.raises(SystemExit, match="neither a number"):
    plan.main(["--hbm_gib=tpu9"])
  with pytest.raises(SystemExit, match="not one of the known architectures"):
    plan.main(["--target=nobody/nothing"])
  with pytest.raises(SystemExit, match="do not divide"):
    plan.main(["--devices=8", "--mesh=data=3,tensor=-1"])
  plans = plan.main(["--config=configs/qwen3_4b.py,configs/qwen3_14b.py"])
  table = capsys.readouterr().out.split("| target |")[1]
  assert "Qwen/Qwen3-4B" in table and "Qwen/Qwen3-14B" in table
  assert plans[0].params < plans[1].params


def test_activation_estimate_bounds_what_xla_allocates(monkeypatch):
  """The activation estimate is an upper estimate of the compiled program's temporaries, and
  not a loose one (CPU XLA's memory analysis; a GPU/TPU compile differs in detail)."""
  import dspark_jax as dj
  from dspark_jax.decoding import speculative
  from dspark_jax.demo import tiny
  target = tiny.random_target(tiny.tiny_config("qwen3", vocab=96, hidden=64, layers=4,
                                               heads=8, kv_heads=4, head_dim=8))
  draft = dj.init_draft(target, "dspark", num_layers=2, block_size=4, target_layer_ids=(0, 2),
                        markov_rank=8)
  real, seen = speculative.spec_generate, {}

  def keep_memory(tgraph, tparams, dgraph, dparams, batch, *args, **static):
    compiled = real.lower(tgraph, tparams, dgraph, dparams, batch, *args, **static).compile()
    seen.update(temp=compiled.memory_analysis().temp_size_in_bytes, shape=batch.tokens.shape,
                steps=static["max_steps"])
    return compiled(tparams, dparams, batch, *args)

  monkeypatch.setattr(speculative, "spec_generate", keep_memory)
  dj.generate(target, [[1 + i] * 200 for i in range(8)], draft=draft, max_new_tokens=32,
              stop_tokens=[])
  b, tp = seen["shape"]
  p = plan.plan(target.config, draft.config, dims=dict(data=1), batch=b, prompt_len=tp,
                max_len=tp + seen["steps"] + draft.config.block_size + 1, dtype="float32")
  assert seen["temp"] <= p.peak_activations <= 2 * seen["temp"], (seen, p.activations)
