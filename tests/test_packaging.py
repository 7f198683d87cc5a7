"""The top-level `kernels` and `dspark_jax` packages are ours (PyPI has an unrelated `kernels`)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_package_is_ours():
  import kernels
  assert pathlib.Path(kernels.__file__).resolve().parent == REPO / "kernels"


def test_dspark_jax_is_ours():
  import dspark_jax
  assert pathlib.Path(dspark_jax.__file__).resolve().parent == REPO / "dspark_jax"


def test_public_api_names():
  import dspark_jax
  for name in ("load_target", "generate", "load_draft", "save_draft", "propose_block",
               "ModelConfig", "make_mesh"):
    assert hasattr(dspark_jax, name), name
