"""Commit: what a step appends to each row's output and when a row is done.

Shared by plain and speculative decoding: a step produces up to W tokens per row; the
row records as many as its limit allows, stops after an accepted stop token, and
finished rows record nothing (their cache writes are masked by the caller).
"""

from __future__ import annotations

import jax.numpy as jnp

from dspark_jax.typing import Array


def is_stop(tokens: Array, stop_tokens: Array) -> Array:
  """`tokens` `[B, ...]` vs per-row stop ids `[B, M]` -> bool `[B, ...]`."""
  extra = tokens.ndim - 1
  stops = stop_tokens.reshape(stop_tokens.shape[:1] + (1,) * extra + stop_tokens.shape[1:])
  return jnp.any(tokens[..., None] == stops, axis=-1)


def record(out: Array, num_out: Array, done: Array, tokens_new: Array, n_new: Array) -> Array:
  """Appends up to `n_new[b]` tokens of `tokens_new[b]` `[B, W]` to each live row's `out`."""
  width = tokens_new.shape[1]
  idx = num_out[:, None] + jnp.arange(width)[None, :]
  valid = (jnp.arange(width)[None, :] < n_new[:, None]) & ~done[:, None]
  idx = jnp.where(valid, idx, out.shape[1])  # out of range -> dropped
  rows = jnp.broadcast_to(jnp.arange(out.shape[0])[:, None], idx.shape)
  return out.at[rows, idx].set(tokens_new, mode="drop")


def round_tokens(drafts: Array, n_acc: Array, next_token: Array,
                 stop_tokens: Array) -> tuple[Array, Array, Array]:
  """Tokens a speculative round commits: `[x_1..x_n, next]`, cut after an accepted stop.

  Args:
    drafts: int32 `[B, P]`; n_acc: int32 `[B]` accepted drafts; next_token: int32 `[B]`.

  Returns:
    (tokens `[B, P+1]`, n_commit `[B]`, hit_stop bool `[B]`)
  """
  _, p = drafts.shape
  slot = jnp.arange(p + 1)[None, :]
  padded = jnp.concatenate([drafts, next_token[:, None]], axis=1)
  tokens = jnp.where(slot < n_acc[:, None], padded, next_token[:, None])
  n_commit = n_acc + 1
  stop = is_stop(tokens, stop_tokens) & (slot < n_commit[:, None])
  first_stop = jnp.argmax(stop, axis=1)
  hit = jnp.any(stop, axis=1)
  return tokens, jnp.where(hit, first_stop + 1, n_commit), hit


def advance(out: Array, num_out: Array, done: Array, tokens: Array, n_commit: Array,
            hit_stop: Array, max_new: Array):
  """Records a step's tokens and updates `done`.

  Returns:
    (out, num_out, done, n_recorded `[B]`)
  """
  live = ~done
  n_rec = jnp.minimum(n_commit, max_new - num_out)
  out = record(out, num_out, done, tokens, n_rec)
  num_out = num_out + jnp.where(live, n_rec, 0)
  done = done | (live & (hit_stop | (num_out >= max_new)))
  return out, num_out, done, n_rec
