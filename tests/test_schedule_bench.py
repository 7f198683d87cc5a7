"""The schedule bench's load-model plumbing on synthetic runs (no model, no timing)."""

import json

import numpy as np

from dspark_jax import schedule_bench


def _run(tmp_path, batch: int, rng) -> str:
  rollouts = [(rng.normal(0.5, 1.0, (12, 5)), rng.integers(0, 6, 12)) for _ in range(3)]
  sps = 1.0 / (0.03 + 0.002 * np.arange(batch * 6 + 1))
  path = tmp_path / f"run_b{batch}.json"
  sets = {"s": {"ar_tokens_per_s": 30.0, "spec": {"fixed": {"tokens_per_s": 20.0},
                                                  "early_stop": {"tokens_per_s": 29.0}}}}
  path.write_text(json.dumps({"policies": ["fixed", "early_stop"], "sts_temperatures": None,
                              "profiles": {str(batch): {"sps": sps.tolist(),
                                                        "propose_s": 0.01}},
                              "batches": {str(batch): {"sets": sets}}}))
  np.savez_compressed(tmp_path / f"run_b{batch}_rollouts.npz",
                      **schedule_bench.pack_rollouts(rollouts))
  return str(path)


def test_load_model_merges_runs(tmp_path):
  rng = np.random.default_rng(0)
  paths = [_run(tmp_path, 1, rng), _run(tmp_path, 4, rng)]
  out = tmp_path / "load.json"
  res = schedule_bench.merge_load(paths, str(out), "1,2,4,8", overwrite=False)
  load = res["load"]
  # 8 exceeds every profiled batch; 2 and 4 use the batch-4 curve.
  assert load["concurrency"] == [1, 2, 4] and load["profile_batch"] == [1, 4, 4]
  assert "72 fixed-length rounds of 6 requests" in load["source"]
  assert all(x["verify_per_request"] == 6 for x in load["policies"]["fixed"])
  for name in ("load.json", "load.md", "load.png"):
    assert (tmp_path / name).exists()
