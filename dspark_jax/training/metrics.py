"""Metric sinks: stdout, `metrics.jsonl`, and TensorBoard event files (via tensorboardX)."""

from __future__ import annotations

import itertools
import json
import os

_WRITERS = itertools.count()  # numbers this process's event files (see MetricsLogger)


class MetricsLogger:
  """Writes each metrics dict to stdout (optional), `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, echo=None,
               resume_step: int | None = None, enabled: bool = True):
    """`resume_step`: drop JSON lines logged after this step by a run that was killed
    before its next checkpoint (they are about to be logged again). `enabled=False` (every
    host but the first in a multi-host run) makes every method a no-op."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(path, "w") as f:
        f.writelines(keep)
    self.jsonl = open(path, "a")
    self.tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # lazy: only the logging host needs it
      # tensorboardX names files by second and hostname and opens them with "wb": the suffix
      # keeps a logger restarted within the same second from truncating the previous file.
      self.tb = SummaryWriter(os.path.join(workdir, "tb"),
                              filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")
    self.echo = echo

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for tag, value in clean.items():
        self.tb.add_scalar(tag, value, global_step=step)
      # tensorboardX writes from a background thread every 2 minutes; flush so a plot (or
      # a killed run's events file) is as current as metrics.jsonl.
      self.tb.flush()
    if self.echo is not None:
      shown = " ".join(f"{k}={v:.4g}" for k, v in clean.items())
      self.echo(f"step {step}: {shown}")

  def close(self):
    if not self.enabled:
      return
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()
