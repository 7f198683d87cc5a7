"""Process-wide kernel selection: `DSPARK_KERNELS=auto|xla|pallas`."""

from __future__ import annotations

import os

CHOICES = ("auto", "xla", "pallas")


def implementation(requested: str | None = None) -> str:
  """The implementation to use: the argument, else `$DSPARK_KERNELS`, else "auto"."""
  impl = requested or os.environ.get("DSPARK_KERNELS", "auto") or "auto"
  if impl not in CHOICES:
    raise ValueError(f"unknown kernel implementation {impl!r}; choose one of {CHOICES} "
                     "(argument or DSPARK_KERNELS)")
  return impl
