"""Small NNX building blocks shared by the target decoder and the drafts.

Parameters carry logical axis names in their `axes` metadata; `dspark_jax.sharding`
maps those names to mesh axes. Weights are stored in einsum-friendly layouts
(`[D, N, H]` for a query projection) rather than HF's flat `[out, in]`, and
`checkpoints/mappings.py` converts between the two.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.typing import Array

_INIT_STD = 0.02


class Buffer(nnx.Variable):
  """A non-trainable array saved with the model (e.g. Gemma 4 `layer_scalar`)."""


def lead(w: Array, ndim: int) -> Array:
  """Adds leading unit axes so `w` broadcasts against an array of rank `ndim` explicitly."""
  return w.reshape((1,) * (ndim - w.ndim) + w.shape)


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float = _INIT_STD) -> Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _matmul_split(eqn: str) -> int | None:
  """Number of contracted axes when `eqn` is a plain matmul over named axes.

  That is `<batch><C>,<C><R>-><batch><R>` (`...` allowed as the batch prefix): x's trailing
  axes C contract with the kernel's leading axes in order. None for any other equation.
  """
  lhs, rest = eqn.replace(" ", "").split(",")
  rhs, out = rest.split("->")
  for c in range(1, len(rhs)):
    if lhs.endswith(rhs[:c]) and out == lhs[:len(lhs) - c] + rhs[c:]:
      batch = lhs[:len(lhs) - c].replace("...", "")
      if (batch.isalpha() or not batch) and not set(batch) & set(rhs):
        return c
  return None


class Linear(nnx.Module):
  """A projection `y = einsum(eqn, x, kernel) (+ bias)` with named-axis params.

  Attributes:
    kernel: weight of shape `shape` (e.g. `[D, N, H]`).
    bias: optional bias of shape `bias_shape` (the output dims).
  """

  def __init__(self, eqn: str, shape: tuple[int, ...], axes: tuple[str | None, ...], *,
               bias_shape: tuple[int, ...] | None = None,
               bias_axes: tuple[str | None, ...] | None = None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.eqn = eqn
    self.kernel = nnx.Param(normal_init(rngs, shape, dtype), axes=axes)
    self.bias = (nnx.Param(jnp.zeros(bias_shape, dtype), axes=bias_axes)
                 if bias_shape is not None else None)

  def __call__(self, x: Array) -> Array:
    split = _matmul_split(self.eqn)
    w = self.kernel[...]
    if split is None:
      y = jnp.einsum(self.eqn, x, w)
    else:
      # One plain [M, C] x [C, R] dot over row-major reshapes (free bitcasts of the kernel).
      # With the einsum, XLA-CPU transposed the whole o_proj kernel ([N, H, D] -> [H, N, D])
      # on every call to match the attention output's layout: ~25 % of a batch-8 decode step.
      rest = w.shape[split:]
      y = jnp.dot(x.reshape(*x.shape[:x.ndim - split], -1), w.reshape(-1, math.prod(rest)))
      y = y.reshape(*x.shape[:x.ndim - split], *rest)
    if self.bias is not None:
      y = y + lead(self.bias[...], y.ndim)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32.

  `offset=1` gives Gemma 3's `(1 + w)` form. `cast_first=True` multiplies the weight
  after casting back to the input dtype (Llama/Qwen order); otherwise the weight is
  applied in float32 (Gemma order). Both are identical in float32.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, offset: float = 0.0, with_scale: bool = True,
               cast_first: bool = False, dtype=jnp.float32):
    self.eps = eps
    self.offset = offset
    self.cast_first = cast_first
    self.scale = (nnx.Param(jnp.full((dim,), 1.0 - offset, dtype), axes=("norm",))
                  if with_scale else None)

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.scale is None:
      return y.astype(x.dtype)
    w = lead(self.scale[...], x.ndim)
    if self.cast_first:
      return y.astype(x.dtype) * (w + self.offset).astype(x.dtype)
    return (y * (w.astype(jnp.float32) + self.offset)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding `[V, D]`, optionally scaled by sqrt(D) as Gemma does.

  Gemma rounds the scale to the parameter dtype before multiplying (sqrt(3072)
  becomes 55.5 in bfloat16), which we reproduce.
  """

  def __init__(self, vocab: int, dim: int, *, scale: float | None = None, dtype=jnp.float32,
               rngs: nnx.Rngs, axes=("vocab", "embed")):
    self.embedding = nnx.Param(normal_init(rngs, (vocab, dim), dtype), axes=axes)
    self.scale = scale

  def __call__(self, tokens: Array) -> Array:
    table = self.embedding[...]
    x = jnp.take(table, tokens, axis=0)
    if self.scale is not None:
      x = x * jnp.asarray(self.scale, table.dtype)
    return x

  def attend(self, h: Array) -> Array:
    """Tied output head: `[..., D] -> [..., V]` logits in float32."""
    return jnp.einsum("...D,VD->...V", h, self.embedding[...],
                      preferred_element_type=jnp.float32)


def activation(name: str):
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f"unknown activation {name!r}")


class MLP(nnx.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU / GeGLU)."""

  def __init__(self, dim: int, hidden: int, *, act: str, bias: bool = False, dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.gate_proj = Linear("...D,DF->...F", (dim, hidden), ("embed", "mlp"),
                            bias_shape=(hidden,) if bias else None, bias_axes=("mlp",), **kw)
    self.up_proj = Linear("...D,DF->...F", (dim, hidden), ("embed", "mlp"),
                          bias_shape=(hidden,) if bias else None, bias_axes=("mlp",), **kw)
    self.down_proj = Linear("...F,FD->...D", (hidden, dim), ("mlp", "embed"),
                            bias_shape=(dim,) if bias else None, bias_axes=("embed",), **kw)
    self.act = act

  def __call__(self, x: Array) -> Array:
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def softcap(x: Array, cap: float | None) -> Array:
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def sqrt_scale(dim: int) -> float:
  return math.sqrt(dim)
