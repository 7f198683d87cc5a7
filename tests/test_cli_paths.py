"""Result files that get committed carry no absolute paths of the machine that wrote them."""

import os

from dspark_jax import cli


def test_portable_paths(monkeypatch, tmp_path):
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path / "cache"))
  root = cli.REPO_ROOT
  obj = {"out": os.path.join(root, "bench_results", "b.json"),
         "eval": os.path.join(os.path.dirname(root), "shared", "data", "eval"),
         "model": [str(tmp_path / "cache" / "models" / "m")], "n": 3, "name": "smollm2",
         "rel": "runs/x.json"}
  got = cli.portable(obj)
  assert got == {"out": os.path.join("bench_results", "b.json"),
                 "eval": "../" + os.path.join("shared", "data", "eval"),
                 "model": ["$DSPARK_JAX_CACHE/" + os.path.join("models", "m")], "n": 3,
                 "name": "smollm2", "rel": "runs/x.json"}
  assert "/" + root.strip("/") not in str(got)
