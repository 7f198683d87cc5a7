"""Test setup: CPU by default (DSPARK_TEST_GPU=1 keeps accelerators), markers, shared fixtures."""

import os
import pathlib
import sys

if os.environ.get("DSPARK_TEST_GPU") != "1":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# serve() keeps compiled programs in the user cache dir (`compilation_cache`); tests do not
# (writing every tiny test program to disk costs time), in this process or the CLIs it starts.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
jax.config.update("jax_enable_compilation_cache", False)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))


def pytest_collection_modifyitems(config, items):
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  skip_gpu = pytest.mark.skip(reason="needs a GPU (run with DSPARK_TEST_GPU=1 on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.exists():
    pytest.skip(f"../shared is absent ({SHARED}); tests that read the shared data are skipped")
  return SHARED


def torch_or_skip():
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    pytest.skip("torch/transformers not installed (pip install -e '.[test]')")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
  """Drop compiled programs and cached buffers after each test module.

  One pytest process compiles a few thousand XLA programs over the suite, and a CI run once
  died with SIGSEGV inside XLA-CPU compilation late in it; releasing every module's executables
  keeps the process smaller (set DSPARK_TEST_RSS=<file> to log its size per module). Modules
  share nothing compiled, so this costs no recompilation inside a module.
  """
  yield
  import gc
  jax.clear_caches()
  gc.collect()
  if os.environ.get("DSPARK_TEST_RSS"):
    import resource
    rss = pathlib.Path("/proc/self/statm").read_text().split()[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.environ["DSPARK_TEST_RSS"], "a") as f:
      f.write(f"{request.module.__name__} rss={int(rss) * 4 // 1024} MiB peak={peak // 1024} MiB\n")
