"""Process-wide kernel selection: `DSPARK_KERNELS=auto|xla|pallas`.

Every op's `api.py` asks `resolve` which backend to run:

  * "xla": the pure-jnp reference (what XLA compiles everywhere);
  * "pallas": the Pallas kernel, in interpret mode on CPU (slow, but it runs the kernel body
    exactly, which is how the kernels are tested without an accelerator) and compiled on a
    platform the kernel was built for; anywhere else it is an error, not a silent fallback,
    because a user who forces a kernel wants to know that it did not run;
  * "auto": the kernel on the platforms it lists as `auto_on` (those where it was compiled,
    tested and measured to pay), else the reference.

`DSPARK_KERNELS=pallas` means "every op that has a Pallas kernel": an op with none built yet
(`resolve(..., built=False)`) runs its reference then, while `implementation="pallas"` passed
to such an op is an error. Every op here has one now (segment attention included).

The choice is made when a function is traced, so it is fixed for a program already compiled
in this process: set the variable before the first call (or call `jax.clear_caches()`).
"""

from __future__ import annotations

import dataclasses
import os

import jax

CHOICES = ("auto", "xla", "pallas")


class KernelUnavailable(NotImplementedError):
  """A forced Pallas kernel cannot run for these arguments or on this platform."""


def implementation(requested: str | None = None) -> str:
  """The implementation to use: the argument, else `$DSPARK_KERNELS`, else "auto"."""
  impl = requested or os.environ.get("DSPARK_KERNELS", "auto") or "auto"
  if impl not in CHOICES:
    raise ValueError(f"unknown kernel implementation {impl!r}; choose one of {CHOICES} "
                     "(argument or DSPARK_KERNELS)")
  return impl


def platform() -> str:
  """The platform programs are compiled for now: "cpu", "gpu" or "tpu"."""
  return jax.default_backend()


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `resolve` picked: `pallas` False means the reference; `interpret` only with pallas."""

  pallas: bool
  interpret: bool = False


def resolve(op: str, requested: str | None = None, *, compiled_on: tuple[str, ...] = (),
            auto_on: tuple[str, ...] = (), unsupported: str | None = None,
            built: bool = True) -> Choice:
  """Picks the backend of one op call.

  Args:
    op: the op's name, for messages.
    requested: "auto" / "xla" / "pallas" or None (then `$DSPARK_KERNELS`).
    compiled_on: platforms the Pallas kernel lowers to (CPU always runs it interpreted).
    auto_on: platforms where "auto" picks the kernel (a subset of `compiled_on`).
    unsupported: why the kernel cannot take these arguments (None: it can); "auto" then
      falls back to the reference and "pallas" raises.
    built: False for an op without any Pallas kernel yet (see the module docstring).

  Raises:
    KernelUnavailable: "pallas" was forced where the kernel cannot run.
  """
  impl = implementation(requested)
  plat = platform()
  if impl == "xla":
    return Choice(pallas=False)
  if impl == "auto" or (not built and requested is None):
    return Choice(pallas=unsupported is None and plat in auto_on)
  if unsupported is not None:
    raise KernelUnavailable(f"{op}: the Pallas kernel cannot run here ({unsupported}); use "
                            "implementation='xla' or DSPARK_KERNELS=auto")
  if plat == "cpu":
    return Choice(pallas=True, interpret=True)
  if plat not in compiled_on:
    raise KernelUnavailable(f"{op}: no Pallas kernel is built for platform {plat!r} (only "
                            f"{', '.join(compiled_on) or 'none'} and CPU interpret mode); use "
                            "implementation='xla' or DSPARK_KERNELS=auto")
  return Choice(pallas=True)
