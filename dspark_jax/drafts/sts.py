"""`sts.json`: the STS temperatures of a draft's confidence head, saved beside its checkpoint.

`python -m dspark_jax.calibrate` writes it; the scheduler reads the temperatures (through
`DraftConfig.sts_temperatures`) to turn raw confidence logits `z_k` into calibrated conditional
confidences `sigmoid(z_k / T_k)`. The file also keeps what the fit was measured on and the
held-out calibration metrics before and after, so a reader can judge the temperatures:

  {"temperatures": [T_1..T_P], "prior": [P], "ece_before": [P], "ece_after": [P],
   "auroc_before": [P], "auroc_after": [P], "brier_before": [P], "brier_after": [P],
   "count": [P], "summary": {...}, "fitted_on": {...}}

"prior" (optional) is the draft's mean conditional acceptance per position on the fit split,
the scheduler's estimate for a request that has not proposed yet (`Scheduler.prior`).

Metrics are of the cumulative product against realised prefix bits on the held-out split
(`dspark_jax.scheduling.calibration`); an undefined metric (e.g. AUROC of a position whose
rounds are all accepted) is stored as null, so the file is strict JSON. Only "temperatures" and
"prior" are read back.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Sequence

from dspark_jax import cli

STS_FILE = "sts.json"
_PER_POSITION = ("ece", "auroc", "brier")


def sts_path(draft_dir: str | os.PathLike) -> str:
  """The `sts.json` path of a draft directory."""
  return os.path.join(os.fspath(draft_dir), STS_FILE)


def _json_number(x) -> float | None:
  """A finite float, or None for NaN / inf (strict JSON has neither)."""
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def _number(x: Any, where: str, what: str) -> float:
  # bool is an int subclass; True as a temperature is a bug in whatever wrote the file.
  if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
    raise ValueError(f"{where}: {what} is {x!r:.40}, not a number")
  return float(x)


def _check_temperatures(temperatures: Sequence, where: str) -> tuple[float, ...]:
  if isinstance(temperatures, (str, bytes, dict)) or not hasattr(temperatures, "__len__"):
    raise ValueError(f"{where}: 'temperatures' must be a list of numbers, got "
                     f"{type(temperatures).__name__}")
  if len(temperatures) == 0:
    raise ValueError(f"{where}: 'temperatures' is empty")
  out = tuple(_number(t, where, f"temperature {k + 1}") for k, t in enumerate(temperatures))
  for k, t in enumerate(out):
    if not math.isfinite(t) or t <= 0:
      raise ValueError(f"{where}: temperature {k + 1} is {t!r}; STS temperatures must be "
                       "finite and > 0")
  return out


def _check_prior(prior: Any, p: int, where: str) -> tuple[float, ...]:
  if isinstance(prior, (str, bytes, dict)) or not hasattr(prior, "__len__") or len(prior) != p:
    raise ValueError(f"{where}: 'prior' must be a list of {p} confidences")
  out = tuple(_number(c, where, f"prior {k + 1}") for k, c in enumerate(prior))
  for k, c in enumerate(out):
    if not 0.0 <= c <= 1.0:
      raise ValueError(f"{where}: prior {k + 1} is {c!r}; confidences lie in [0, 1]")
  return out


def write_sts(draft_dir: str | os.PathLike, temperatures: Sequence[float], *,
              report_before: dict, report_after: dict, data: dict,
              prior: Sequence[float] | None = None) -> str:
  """Writes `sts.json` into `draft_dir` atomically (a temporary file, then a rename).

  Args:
    draft_dir: directory to write into (created if missing).
    temperatures: `[P]` fitted temperatures (finite, > 0).
    report_before: `calibration_report` of the raw head on the held-out split (lists of length
      P under "ece", "auroc", "brier", "count", and a "summary" dict).
    report_after: the same with the temperatures applied.
    data: what the fit was measured on (prompts file, split sizes, sampling settings, ...);
      must be JSON-serialisable; stored under "fitted_on".
    prior: `[P]` mean conditional acceptance per position (`calibration.prior_confidence`).

  Returns:
    The path written.

  Raises:
    ValueError: invalid temperatures, or reports whose lists do not have P entries.
  """
  temps = _check_temperatures(list(temperatures), "write_sts")
  p = len(temps)
  payload: dict[str, Any] = {"temperatures": list(temps)}
  if prior is not None:
    payload["prior"] = list(_check_prior(list(prior), p, "write_sts"))
  for tag, report in (("before", report_before), ("after", report_after)):
    for name in _PER_POSITION:
      values = list(report[name])
      if len(values) != p:
        raise ValueError(f"write_sts: report_{tag}[{name!r}] has {len(values)} entries for "
                         f"{p} temperatures")
      payload[f"{name}_{tag}"] = [_json_number(v) for v in values]
  payload["count"] = [int(c) for c in report_after["count"]]
  payload["summary"] = {f"{name}_{tag}": _json_number(report["summary"][name])
                        for tag, report in (("before", report_before), ("after", report_after))
                        for name in _PER_POSITION}
  payload["fitted_on"] = cli.portable(data)  # committed with drafts: no machine paths
  text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
  draft_dir = os.fspath(draft_dir)
  os.makedirs(draft_dir, exist_ok=True)
  path = sts_path(draft_dir)
  # Same directory, so the rename is atomic: a reader never sees a half-written file.
  fd, tmp = tempfile.mkstemp(prefix=".sts.", suffix=".json.tmp", dir=draft_dir)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shipped draft file must be world-readable
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _load(draft_dir: str | os.PathLike) -> tuple[str, dict] | None:
  """(path, the parsed object) of `draft_dir/sts.json`, or None when there is no such file."""
  path = os.fspath(draft_dir)
  if os.path.isdir(path):
    path = sts_path(path)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return path, obj


def read_sts(draft_dir: str | os.PathLike) -> tuple[float, ...] | None:
  """The temperatures of `draft_dir/sts.json`, or None when the draft has no such file.

  Args:
    draft_dir: a draft directory (or the path of an `sts.json` file itself).

  Returns:
    `(T_1, ..., T_P)` or None.

  Raises:
    ValueError: a malformed file (not JSON, not an object, no "temperatures", a non-numeric,
      non-finite or non-positive temperature), with a one-line message naming the file.
  """
  found = _load(draft_dir)
  if found is None:
    return None
  path, obj = found
  if "temperatures" not in obj:
    raise ValueError(f"{path}: no 'temperatures' list")
  temps = obj["temperatures"]
  if not isinstance(temps, list):
    raise ValueError(f"{path}: 'temperatures' must be a list of numbers, got "
                     f"{type(temps).__name__}")
  return _check_temperatures(temps, path)


def read_sts_prior(draft_dir: str | os.PathLike) -> tuple[float, ...] | None:
  """The "prior" of `draft_dir/sts.json` (`[P]` confidences), or None when the file or the
  entry is missing (files written before it existed). Raises ValueError when malformed."""
  found = _load(draft_dir)
  if found is None or found[1].get("prior") is None:
    return None
  path, obj = found
  return _check_prior(obj["prior"], len(obj["prior"]) if isinstance(obj["prior"], list) else -1,
                      path)
