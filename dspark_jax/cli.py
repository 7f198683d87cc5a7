"""absl-flags plumbing of the `python -m dspark_jax.<tool>` commands (bench, evaluate).

Each tool defines its flags on its own `flags.FlagValues`, not absl's global one: both modules
define `--target`, `--out`, ... and are imported into one process by the tests, and a tool's
`main(argv)` must be callable repeatedly (every call starts from the defaults).

Relative paths given to a tool (`--eval_dir=../shared/data/eval`, `--out=runs/x.json`) are
taken relative to the repository root, the directory above the `dspark_jax` package, so the
commands mean the same from any current directory.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Sequence

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull", "-?")


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None,
          doc: str) -> types.SimpleNamespace:
  """Parses `argv` into `flag_values`, starting from the defaults.

  Args:
    flag_values: the tool's own flags.
    argv: arguments without the program name; None = `sys.argv[1:]`.
    doc: the tool's usage text, printed above the flags by `--help`.

  Returns:
    The flag values by name (`vars()` gives a dict).

  Raises:
    SystemExit: 0 after printing the help (`--help`); with a one-line message for an unknown
      flag, a bad value or a positional argument.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  if any(a in _HELP for a in argv):
    print(f"{doc.rstrip()}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}")
    raise SystemExit(0)
  flag_values.unparse_flags()
  try:
    rest = flag_values([sys.argv[0] or "dspark_jax"] + argv)
  except flags.Error as e:
    raise SystemExit(f"error: {e} (see --help)") from None
  if len(rest) > 1:
    raise SystemExit(f"error: unexpected arguments {rest[1:]} (see --help)")
  return types.SimpleNamespace(**flag_values.flag_values_dict())


def repo_path(path: str) -> str:
  """`path` (with `~` expanded) if absolute, else joined onto `REPO_ROOT`."""
  path = os.path.expanduser(path)
  return os.path.normpath(path if os.path.isabs(path) else os.path.join(REPO_ROOT, path))


def check_outputs(paths: Sequence[str], overwrite: bool) -> None:
  """Refuses (SystemExit) to replace an existing output file unless `overwrite`.

  Called before any work, so a forgotten `--out` costs nothing and committed results (e.g.
  `bench_results/`) are never replaced by accident.
  """
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise SystemExit(f"error: {existing[0]} exists; pass --overwrite to replace it, or choose "
                     "another --out")


def portable(obj):
  """`obj` with this machine's absolute paths made portable, for files that get committed.

  Paths inside the repository become repo-relative, paths beside it (`../shared`) keep that
  form, paths in the user cache dir start with `$DSPARK_JAX_CACHE/` (see `demo.models`),
  other paths under the home directory with `~/`. Dicts, lists and tuples are walked.
  """
  if isinstance(obj, dict):
    return {k: portable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [portable(v) for v in obj]
  if not (isinstance(obj, str) and os.path.isabs(obj)):
    return obj
  path = os.path.normpath(obj)
  parent = os.path.dirname(REPO_ROOT)
  cache = os.environ.get("DSPARK_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "dspark_jax")
  for root, prefix in ((REPO_ROOT, ""), (os.path.normpath(cache), "$DSPARK_JAX_CACHE"),
                       (parent, ".."), (os.path.expanduser("~"), "~")):
    if path == root or path.startswith(root + os.sep):
      rel = os.path.relpath(path, root)
      if not prefix:
        return rel
      return prefix if rel == "." else f"{prefix}/{rel}"
  return obj


def write_json(path: str, obj, *, table: str | None = None) -> None:
  """Writes `obj` as JSON to `path` (parents created, machine paths made `portable`) and,
  with `table`, prints it and writes it as markdown beside the JSON."""
  import json
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(portable(obj), f, indent=1)
  if table is not None:
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
      f.write(table + "\n")
    print(table)
