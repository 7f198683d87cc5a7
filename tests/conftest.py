"""Test setup: CPU by default (DSPARK_TEST_GPU=1 keeps accelerators), markers, shared fixtures."""

import os
import pathlib
import sys

if os.environ.get("DSPARK_TEST_GPU") != "1":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

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
