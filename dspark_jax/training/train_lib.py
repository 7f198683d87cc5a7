"""Draft training: optimizer, jitted train step with online target features, orbax
checkpoints with exact resume, metrics, export.

The frozen target is an argument of the step, never part of the optimised state.
Master weights are float32; the forward runs in `compute_dtype` (bf16 on GPU/TPU).
Gradient accumulation is a `lax.scan` over micro-batches inside one jitted step, and
each micro-batch's loss is normalised over its own tokens, as DeepSpec does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dspark_jax import sharding as sharding_lib
from dspark_jax.typing import Array


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> Callable:
  """DeepSpec: lr = peak*(i+1)/W for i < W, then cosine from peak to 0 over the rest."""
  warmup = max(1, int(warmup_ratio * total_steps))
  decay = max(1, total_steps - warmup)

  def schedule(i):
    i = jnp.asarray(i, jnp.float32)
    warm = peak * (i + 1) / warmup
    cos = peak * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(i - warmup, 0, decay) / decay))
    return jnp.where(i < warmup, warm, cos)

  return schedule


def make_optimizer(tcfg, total_steps: int):
  schedule = lr_schedule(tcfg.lr, total_steps, tcfg.warmup_ratio)
  opt = optax.chain(
      optax.clip_by_global_norm(tcfg.max_grad_norm),
      optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay))
  return opt, schedule


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Attributes:
    step: int32 scalar, optimizer steps taken.
    params: trainable draft params (float32 masters), an `nnx.State`.
    opt_state: optax state over `params` only.
    key: uint32 key data of the base PRNG key (per-step keys fold in `step`).
  """

  step: Array
  params: Any
  opt_state: Any
  key: Array


def split_draft(module: nnx.Module):
  """-> (graphdef, trainable Params, non-trainable rest, e.g. Gemma 4 layer scalars)."""
  return nnx.split(module, nnx.Param, ...)


def cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable)."""

  tgraph: Any
  dgraph: Any
  objective: Callable  # (draft, target_model, micro_batch dict, features, key) -> (loss, stats)
  optimizer: Any = dataclasses.field(compare=False, hash=False)
  compute_dtype: Any = jnp.float32
  taps: tuple[int, ...] = ()
  online_features: bool = True

  def __hash__(self):
    return hash((self.tgraph, self.dgraph, self.objective, id(self.optimizer),
                 jnp.dtype(self.compute_dtype).name, self.taps, self.online_features))

  def __eq__(self, other):
    return hash(self) == hash(other)


def target_features(tmodel, tokens: Array, taps: tuple[int, ...]):
  """Online features from the frozen target: (taps `[B, S, C]`, final hidden `[B, S, D]`)."""
  out = tmodel(tokens, taps=taps, compute_logits=False)
  return jax.lax.stop_gradient(out.taps), jax.lax.stop_gradient(out.hidden)


def micro_loss(params, rest, target_params, mb: dict, key, sc: StepConfig):
  tmodel = nnx.merge(sc.tgraph, target_params)
  draft = nnx.merge(sc.dgraph, cast_floats(params, sc.compute_dtype), rest)
  if sc.online_features:
    taps, hidden = target_features(tmodel, mb["tokens"], sc.taps)
  else:
    taps, hidden = mb["taps"], mb["hidden"]
  return sc.objective(draft, tmodel, mb, taps.astype(sc.compute_dtype),
                      hidden.astype(sc.compute_dtype), key)


def train_step(state: TrainState, rest, target_params, batch: dict, sc: StepConfig):
  """One optimizer step over `batch` arrays shaped `[A, b, ...]` (A micro-batches)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  accum = batch["tokens"].shape[0]
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def body(carry, xs):
    g_acc, s_acc = carry
    mb, i = xs
    (loss, stats), g = grad_fn(state.params, rest, target_params, mb, jax.random.fold_in(key, i),
                               sc)
    stats = dict(stats, loss=loss)
    g_acc = jax.tree.map(jnp.add, g_acc, g)
    s_acc = jax.tree.map(jnp.add, s_acc, stats) if s_acc is not None else stats
    return (g_acc, s_acc), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  # First micro-batch outside the scan fixes the stats structure.
  (l0, s0), g0 = grad_fn(state.params, rest, target_params, jax.tree.map(lambda x: x[0], batch),
                         jax.random.fold_in(key, 0), sc)
  s0 = dict(s0, loss=l0)
  g0 = jax.tree.map(jnp.add, zeros, g0)
  if accum > 1:
    rest_batch = jax.tree.map(lambda x: x[1:], batch)
    (g0, s0), _ = jax.lax.scan(body, (g0, s0), (rest_batch, jnp.arange(1, accum)))
  grads = jax.tree.map(lambda g: g / accum, g0)
  updates, opt_state = sc.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(s0, loss=s0["loss"] / accum, ce=s0["ce"] / accum, l1=s0["l1"] / accum,
                 bce=s0["bce"] / accum, grad_norm=optax.global_norm(grads))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=state.key), metrics


def summarize(metrics: dict, lr: float) -> dict[str, float]:
  """Host-side: turn accumulated sums into the logged scalars."""
  m = {k: np.asarray(v) for k, v in metrics.items()}
  out = {"loss": float(m["loss"]), "ce": float(m["ce"]), "l1": float(m["l1"]),
         "bce": float(m["bce"]), "grad_norm": float(m["grad_norm"]), "lr": float(lr)}
  cnt = np.maximum(m["pos_count"], 1)
  for k, (a, al) in enumerate(zip(m["pos_agree"] / cnt, m["pos_alpha"] / cnt)):
    out[f"top1_agree@{k}"] = float(a)
    out[f"accept@{k}"] = float(al)
  out["tau_est"] = float(m["tau_sum"] / max(float(m["blocks"]), 1.0))
  return out


def state_shardings(state: TrainState, mesh, param_shardings):
  rep = NamedSharding(mesh, P())

  def like(tree):
    # optimizer moments mirror the params they belong to; scalars are replicated
    return jax.tree.map(lambda x: rep, tree)

  opt_sh = _opt_shardings(state.opt_state, state.params, param_shardings, rep)
  return TrainState(step=rep, params=param_shardings, opt_state=opt_sh, key=rep)


def _opt_shardings(opt_state, params, param_shardings, rep):
  """Shard optimizer leaves shaped like a param the way that param is sharded."""
  flat_p, _ = jax.tree.flatten(params)
  flat_s = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  by_shape = {}
  for p_, s_ in zip(flat_p, flat_s):
    by_shape.setdefault(tuple(p_.shape), s_)
  return jax.tree.map(lambda x: by_shape.get(tuple(getattr(x, "shape", ())), rep)
                      if getattr(x, "ndim", 0) > 0 else rep, opt_state)


def batch_sharding(mesh) -> NamedSharding:
  """`[A, b, ...]` batches: the micro-batch axis is split over (data, fsdp)."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  return NamedSharding(mesh, P(None, axes if axes else None))


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
class Checkpointer:
  """Orbax manager for (TrainState, data-iterator state). Saves are atomic directories."""

  def __init__(self, directory: str, keep: int = 2):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: TrainState, meta: dict):
    ocp = self.ocp
    self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)))
    self.mngr.wait_until_finished()

  def restore(self, step: int, abstract_state: TrainState):
    ocp = self.ocp
    restored = self.mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def close(self):
    self.mngr.close()
