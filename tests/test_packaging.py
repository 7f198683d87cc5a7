"""The `dspark_jax` package is ours, and `kernels` is left to Hugging Face's package."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_package():
  """transformers (>= 5.25) imports Hugging Face's `kernels`; a top-level package of ours by
  that name shadowed it whenever the repo root was on `sys.path` (train.py, serve.py)."""
  assert not (REPO / "kernels").exists()
  import dspark_jax.kernels
  assert pathlib.Path(dspark_jax.kernels.__file__).resolve().parent == REPO / "dspark_jax" / "kernels"


def test_dspark_jax_is_ours():
  import dspark_jax
  assert pathlib.Path(dspark_jax.__file__).resolve().parent == REPO / "dspark_jax"


def test_public_api_names():
  import dspark_jax
  for name in ("load_target", "generate", "load_draft", "save_draft", "propose_block",
               "ModelConfig", "make_mesh"):
    assert hasattr(dspark_jax, name), name


def test_demo_package_is_reached_only_lazily():
  """`target` resolves demo names through `dspark_jax.demo` at load time; the demo package
  imports `target`, never the reverse at import time (no cycle)."""
  import subprocess
  import sys
  code = ("import sys, dspark_jax, dspark_jax.target, dspark_jax.drafts.checkpoint\n"
          "assert not [m for m in sys.modules if m.startswith('dspark_jax.demo')], 'eager'\n"
          "from dspark_jax.demo import tiny\n"
          "from dspark_jax import testing\n"
          "assert testing.random_target is tiny.random_target\n"
          "print('ok')\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
