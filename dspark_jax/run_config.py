"""Run-config helpers shared by `train.py`, `serve.py` and tests.

ml_collections' own message for a mistyped `--config.x.y=` override is a bare
`AttributeError: "'y'"`; `check_overrides` names the field and lists the valid ones first.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Sequence

import ml_collections


class ConfigError(ValueError):
  """A run config or a command-line override that does not match the config's fields."""


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """Imports `path` (a `configs/*.py` file) and returns its locked `get_config()`."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  # configs/*.py import their siblings as `from configs import common`, as they do when
  # train.py runs from the repo root: put the configs dir's parent on the path.
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_run_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config()")
  cfg = module.get_config()
  cfg.lock()
  return cfg


def _lookup(cfg, dotted: str):
  node = cfg
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      where = ".".join(parts[:i]) or "<root>"
      valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, Mapping)) \
          else []
      raise ConfigError(f"unknown config field {dotted!r}: {where} has no field {part!r}"
                        + (f"; valid fields: {', '.join(valid)}" if valid else ""))
    node = node[part]
  return node


def check_overrides(cfg: ml_collections.ConfigDict, argv: Sequence[str],
                    flag: str = "config") -> None:
  """Raises ConfigError for any `--<flag>.<field>[=value]` in argv naming no field of cfg."""
  prefix = f"--{flag}."
  for arg in argv:
    if arg.startswith(prefix):
      _lookup(cfg, arg[len(prefix):].split("=", 1)[0])


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
  """Returns a copy of cfg with dotted-path overrides applied (unknown paths rejected)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for dotted, value in overrides.items():
    _lookup(cfg, dotted)
    *head, last = dotted.split(".")
    node = cfg
    for part in head:
      node = node[part]
    node[last] = value
  cfg.lock()
  return cfg


def config_file_from_argv(argv: Sequence[str], flag: str = "config",
                          default: str | None = None) -> str | None:
  """The value of `--<flag>=FILE` (or `--<flag> FILE`) in argv, else `default`."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1]
    if arg == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def precheck_argv(argv: Sequence[str], default_file: str | None = None) -> None:
  """Called before absl parses flags: exits with a one-line message on a bad override."""
  import sys
  path = config_file_from_argv(argv, default=default_file)
  if not path or not os.path.exists(path):
    return  # absl reports the missing/invalid --config itself
  try:
    check_overrides(load_config_file(path), argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")


def describe_fields(path: str | os.PathLike) -> str:
  """`--config.<field>=<default>  <comment>` lines for a flat `configs/*.py` (for --help).

  Reads the config's own source, so the help says what the file says, field by field.
  """
  import re
  lines, above = [], []
  pat = re.compile(r"^\s*c\.(\w+)\s*=\s*(.+?)\s*(?:#\s*(.*))?$")
  for line in open(path):
    m = pat.match(line)
    if m and "ConfigDict" not in m.group(2):
      name, default = m.group(1), m.group(2)
      doc = " ".join(above + [m.group(3)] if m.group(3) else above)  # comments above it too
      lines.append(f"  --config.{name}={default}" + (f"\n      {doc}" if doc else ""))
    comment = re.match(r"^\s*#\s*(.*)$", line)
    above = above + [comment.group(1)] if comment else []
  return "\n".join(lines)
