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


def test_help_describes_every_serve_field():
  """`--help` lists each config field with its default and the comment that documents it,
  whether the comment is on the field's line or on the lines above it."""
  from dspark_jax import run_config
  path = os.path.join(cli.REPO_ROOT, "configs", "serve.py")
  text = run_config.describe_fields(path)
  cfg = run_config.load_config_file(path)
  import re
  blocks = re.split(r"\n(?=  --config\.)", text)
  names = [re.match(r"  --config\.(\w+)=", b).group(1) for b in blocks]
  assert sorted(names) == sorted(k for k in cfg if k != "mesh")  # the mesh: a nested dict
  undocumented = [n for n, b in zip(names, blocks) if "\n      " not in b]
  assert undocumented == [], undocumented
  assert "Verify-length policy: auto" in text  # a comment above its field


def test_compilation_cache_respects_a_configured_directory(monkeypatch, tmp_path):
  import jax
  from dspark_jax.serving.app import use_compilation_cache
  monkeypatch.setenv("DSPARK_JAX_CACHE", str(tmp_path / "cache"))
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert use_compilation_cache(False) is None
    assert use_compilation_cache(True) == str(tmp_path / "cache" / "xla")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert use_compilation_cache(True) == str(tmp_path / "mine")  # left as configured
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
