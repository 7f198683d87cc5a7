"""GPU benchmark of the speculative loop and of the Pallas kernels (one H100/H200).

A Qwen3-4B-shaped (or `--model=8b`) target and DSpark draft (block 7, Markov rank 256) with random bf16
weights. Random drafts are almost never accepted, so acceptance is synthetic: an acceptance
rule registered for this run accepts exactly `--accept` drafts per round (tau =
accept + 1 committed tokens per round), which fixes the number of rounds while every other
part of the loop (propose, verify, commit, the while loop) runs for real.

Per batch size it reports:
  * AR and speculative seconds per generated token (decode only: a 1-token run, i.e. the
    prefill and fixed costs, is subtracted), the measured speedup;
  * T_propose and T_verify (ms per call, timed alone by `engine.profile.round_split`), the
    ideal speedup tau * T_AR / (T_propose + T_verify) and loop efficiency = measured / ideal;
  * per-op microseconds of each kernel against its XLA reference at this batch's shapes
    (verify attention of one layer included),
    and the Markov sampler's share of a round (T_markov / (T_propose + T_verify));
  * with `--tree`, the loop with token-tree verification of that shape at the same synthetic
    tau (the first-child path accepted), i.e. what verifying the whole tree costs.
The speculative loop is timed once per `--kernels` choice (DSPARK_KERNELS).

  python scripts/gpu_bench.py                    # the GPU run (writes runs/gpu_bench.json)
  python scripts/gpu_bench.py --smoke            # tiny config, CPU-friendly (kernels interpreted)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.config import FULL, ModelConfig, RopeConfig  # noqa: E402
from dspark_jax.decoding import speculative  # noqa: E402
from dspark_jax.demo import tiny  # noqa: E402
from dspark_jax.drafts import api as draft_api  # noqa: E402
from dspark_jax.engine import profile  # noqa: E402
from dspark_jax.kernels import dispatch  # noqa: E402
from dspark_jax.kernels import attention, markov_sampler, prefix_accept, tree_accept  # noqa: E402


def qwen3_config(size: str = "4b") -> ModelConfig:
  """Qwen3-4B's or Qwen3-8B's shapes (HF config.json of Qwen/Qwen3-4B, Qwen/Qwen3-8B)."""
  hidden, inter, layers, heads, tied = {"4b": (2560, 9728, 36, 32, True),
                                        "8b": (4096, 12288, 36, 32, False)}[size]
  return ModelConfig(family="qwen3", vocab_size=151936, hidden_size=hidden,
                     intermediate_size=inter, num_layers=layers, num_heads=heads,
                     num_kv_heads=8, head_dim=128, layer_types=(FULL,) * layers,
                     rope_full=RopeConfig(theta=1e6), qk_norm=True, attn_scale=128 ** -0.5,
                     hidden_act="silu", tie_word_embeddings=tied,
                     max_position_embeddings=40960, eos_token_ids=(), pad_token_id=0)


def setup(smoke: bool, model: str = "4b"):
  """(target, draft, settings) with random weights."""
  if smoke:
    cfg = tiny.tiny_config("qwen3", vocab=301, hidden=32, layers=4)
    target = tiny.random_target(cfg, seed=0, dtype=jnp.float32)
    draft = draft_api.init_draft(target, "dspark", num_layers=1, block_size=3,
                                 target_layer_ids=(0, 2), markov_rank=16, seed=0)
    return target, draft, dict(prompt_len=12, new_tokens=33, batches=(1, 3), repeats=3,
                               split_rounds=16)
  target = tiny.random_target(qwen3_config(model), seed=0, dtype=jnp.bfloat16)
  draft = draft_api.init_draft(target, "dspark", num_layers=5, block_size=7,
                               target_layer_ids=(1, 9, 17, 25, 33), markov_rank=256,
                               mask_token_id=151669, seed=0)
  return target, draft, dict(prompt_len=128, new_tokens=129, batches=(1, 8, 64), repeats=3,
                             split_rounds=16)


def fixed_acceptance(n: int):
  """An acceptance rule that accepts exactly min(n, l_b) drafts; the next token is the
  target's argmax there (synthetic: fixes tau at n + 1 for timing, not lossless)."""

  def rule(target_logits, proposal, verify_len, keys_accept, keys_sample, params):
    n_acc = jnp.minimum(jnp.int32(n), verify_len)
    rows = jnp.arange(target_logits.shape[0])
    return n_acc, jnp.argmax(target_logits[rows, n_acc], axis=-1).astype(jnp.int32)

  return rule


def fixed_tree_acceptance(n: int):
  """The tree version of `fixed_acceptance`: the first-child path's first n nodes."""

  def rule(target_logits, proposal, keys_accept, keys_sample, params, shape):
    b = target_logits.shape[0]
    leaf = jnp.full((b,), shape.offsets[n], jnp.int32)  # depth-n node of the first-child path
    best = jnp.argmax(target_logits[jnp.arange(b), leaf], axis=-1).astype(jnp.int32)
    return jnp.full((b,), n, jnp.int32), best, leaf

  return rule


def median_s(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def decode_s_per_token(target, prompts, new_tokens: int, repeats: int, **kw) -> float:
  """Seconds per generated token, the prefill (a 1-token run) subtracted."""
  run = lambda n: (lambda: dj.generate(target, prompts, max_new_tokens=n, stop_tokens=[],
                                       batch_size=len(prompts), **kw).tokens)
  return (median_s(run(new_tokens), repeats) - median_s(run(1), repeats)) / (new_tokens - 1)


def _looped(op, calls: int):
  """A jitted program running `op` `calls` times in a loop, so launch overhead is amortised;
  each call's first (float) argument depends on the last result so none can be hoisted."""

  def run(first, *rest):
    def body(_, acc):
      res = op(first + acc * 1e-30, *rest)
      # Every output is consumed (else XLA drops e.g. the token draw from the reference).
      return acc + sum(jnp.sum(x).astype(jnp.float32) for x in res)
    return jax.lax.fori_loop(0, calls, body, jnp.float32(0))

  return jax.jit(run)


def op_micros(target, draft, b: int, repeats: int, impls, calls: int = 8,
              tree: tree_accept.TreeShape | None = None, cache_len: int = 512) -> dict:
  """Microseconds per call of each kernel op and its XLA reference at this batch's shapes
  (`calls` calls per timed program)."""
  p, v = draft.config.block_size, target.config.vocab_size
  r = draft.config.markov_rank
  dtype = draft.dtype
  k = jax.random.split(jax.random.key(0), 8)
  base = jax.random.normal(k[0], (b, p, v), jnp.float32)
  w1 = jax.random.normal(k[1], (v, r), dtype)
  w2 = (jax.random.normal(k[2], (r, v)) * 0.05).astype(dtype)
  e0 = jax.random.normal(k[3], (b, r), dtype)
  uni = jax.random.uniform(k[4], (b, p))
  temp = jnp.full((b,), 0.7, jnp.float32)
  pt = jax.nn.softmax(jax.random.normal(k[5], (b, p + 1, v)), -1)
  qd = jax.nn.softmax(jax.random.normal(k[6], (b, p, v)), -1)
  drafts = jax.random.randint(k[7], (b, p), 0, v, jnp.int32)
  ell = jnp.full((b,), p, jnp.int32)
  u = jax.random.uniform(k[0], (b, p))
  su = jax.random.uniform(k[1], (b,))
  logits = jnp.log(pt)
  # name -> (fn(implementation) -> jitted op, its arguments)
  ops = {
      "markov_greedy": (lambda impl: lambda *a: markov_sampler.markov_sample(
          *a, implementation=impl), (base, e0, w1, w2)),
      "markov_sampled": (lambda impl: lambda *a: markov_sampler.markov_sample(
          *a[:4], uniforms=a[4], temperature=a[5], implementation=impl),
          (base, e0, w1, w2, uni, temp)),
      "accept_sampled": (lambda impl: lambda *a: prefix_accept.prefix_accept(
          *a, implementation=impl), (pt, qd, drafts, ell, u, su)),
      "accept_greedy": (lambda impl: lambda *a: prefix_accept.greedy_accept(
          *a, implementation=impl), (logits, drafts, ell)),
  }
  # Verify attention of one layer: P+1 queries per row over a cache of `cache_len` slots
  # (committed up to `cache_len - P - 1`) plus the block's own keys.
  cfg = target.config
  kh, hd, nh = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
  q = jax.random.normal(k[2], (b, p + 1, nh, hd), dtype)
  kc = jax.random.normal(k[3], (b, kh, hd, cache_len), dtype)
  vc = jax.random.normal(k[4], (b, kh, cache_len, hd), dtype)
  kn = jax.random.normal(k[5], (b, kh, hd, p + 1), dtype)
  vn = jax.random.normal(k[6], (b, kh, p + 1, hd), dtype)
  lens = jnp.full((b,), cache_len - p - 1, jnp.int32)
  qpos = lens[:, None] + jnp.arange(p + 1, dtype=jnp.int32)[None]

  def verify_attention(qq, kc, vc, kn, vn, impl):
    past = attention.KV(kc, vc, lengths=lens)
    own = attention.KV(kn, vn, positions=qpos)
    return (attention.attention(qq, past, own, q_positions=qpos, scale=hd ** -0.5,
                                implementation=impl),)

  ops["verify_attention"] = (lambda impl: lambda *a: verify_attention(*a, impl),
                             (q, kc, vc, kn, vn))
  if tree is not None:
    w = tree.width
    tp = jax.nn.softmax(jax.random.normal(k[2], (b, w, v)), -1)
    tq = jax.nn.softmax(jax.random.normal(k[3], (b, w, v)), -1)
    toks = jax.random.randint(k[4], (b, w), 0, v, jnp.int32)
    tu = jax.random.uniform(k[5], (b, w))
    ops["tree_accept_sampled"] = (lambda impl: lambda *a: tree_accept.tree_accept(
        *a, shape=tree, implementation=impl), (tp, tq, toks, tu, g))
    ops["tree_accept_greedy"] = (lambda impl: lambda *a: tree_accept.greedy_tree_accept(
        *a, shape=tree, implementation=impl), (jnp.log(tp), toks))
  out = {}
  for name, (make, op_args) in ops.items():
    out[name] = {}
    for impl in impls:
      fn = _looped(make(impl), calls)
      try:
        out[name][impl] = 1e6 * median_s(lambda: fn(*op_args), repeats) / calls
      except Exception as e:  # a kernel that does not lower is a result, not a crash
        out[name][impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny config (CPU; kernels interpreted)")
  ap.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,8,64)")
  ap.add_argument("--model", default="4b", choices=("4b", "8b"),
                  help="Qwen3 shapes of the random target (8b: ~16 GB of bf16 weights)")
  ap.add_argument("--accept", type=int, default=3, help="drafts accepted per round (tau - 1)")
  ap.add_argument("--kernels", default="xla,pallas", help="DSPARK_KERNELS values for the loop")
  ap.add_argument("--tree", default="", help="also time token-tree verification of this shape "
                  "(children per depth, depth = the block; e.g. 2,2,1,1,1,1,1)")
  ap.add_argument("--out", default="", help="JSON output (default runs/gpu_bench[_smoke].json)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out or f"runs/gpu_bench{'_smoke' if args.smoke else ''}.json")
  out = out if out.is_absolute() else REPO / out
  if out.exists() and not args.overwrite:
    ap.error(f"{out.name} exists (pass --overwrite to replace it)")

  target, draft, s = setup(args.smoke, args.model)
  batches = tuple(int(x) for x in args.batches.split(",")) if args.batches else s["batches"]
  impls = tuple(args.kernels.split(","))
  p = draft.config.block_size
  accept = min(args.accept, p)
  tau = accept + 1
  rule = f"fixed{accept}"
  speculative.ACCEPT_RULES[rule] = fixed_acceptance(accept)
  tree = tree_accept.TreeShape.parse(args.tree) if args.tree else None
  if tree is not None:
    if tree.num_draft != p:
      ap.error(f"--tree has depth {tree.num_draft}; the draft's block is {p}")
    speculative.TREE_ACCEPT_RULES[rule] = fixed_tree_acceptance(accept)
  rng = np.random.default_rng(0)
  results = {"device": str(jax.devices()[0]), "platform": dispatch.platform(),
             "model": "smoke" if args.smoke else f"qwen3-{args.model}-shaped",
             "smoke": args.smoke, "block": p, "tau": tau, "markov_rank": draft.config.markov_rank,
             "vocab": target.config.vocab_size, "new_tokens": s["new_tokens"],
             "prompt_len": s["prompt_len"], "tree": list(tree.branching) if tree else None,
             "batches": {}}
  for b in batches:
    prompts = [rng.integers(1, target.config.vocab_size, s["prompt_len"]).tolist()
               for _ in range(b)]
    row = {}
    os.environ["DSPARK_KERNELS"] = "xla"
    jax.clear_caches()
    t_ar = decode_s_per_token(target, prompts, s["new_tokens"], s["repeats"])
    split = profile.round_split(target, draft, prompts, rounds=s["split_rounds"],
                                repeats=s["repeats"])
    t_round = (split["propose_ms"] + split["verify_ms"]) / 1e3
    ideal = tau * t_ar / t_round
    row.update(ar_ms_per_token=1e3 * t_ar, propose_ms=split["propose_ms"],
               verify_ms=split["verify_ms"], ideal_speedup=ideal, loop={})
    for impl in impls:
      os.environ["DSPARK_KERNELS"] = impl
      jax.clear_caches()  # the choice is made at trace time
      try:
        t_spec = decode_s_per_token(target, prompts, s["new_tokens"], s["repeats"], draft=draft,
                                    acceptance=rule, scheduler="fixed")
        speedup = t_ar / t_spec
        row["loop"][impl] = dict(spec_ms_per_token=1e3 * t_spec, speedup=speedup,
                                 loop_efficiency=speedup / ideal)
      except Exception as e:
        row["loop"][impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      if tree is None:
        continue
      try:
        t_tree = decode_s_per_token(target, prompts, s["new_tokens"], s["repeats"],
                                    draft=draft, acceptance=rule, tree=tree)
        row["loop"][f"{impl}+tree"] = dict(spec_ms_per_token=1e3 * t_tree,
                                           speedup=t_ar / t_tree,
                                           loop_efficiency=t_ar / t_tree / ideal)
      except Exception as e:
        row["loop"][f"{impl}+tree"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    os.environ["DSPARK_KERNELS"] = "xla"
    row["ops_us"] = op_micros(target, draft, b, s["repeats"], impls, tree=tree,
                              cache_len=s["prompt_len"] + s["new_tokens"] + p + 1)
    row["markov_share_of_round"] = {
        impl: us / 1e6 / t_round for impl, us in row["ops_us"]["markov_greedy"].items()
        if isinstance(us, float)}
    results["batches"][str(b)] = row
    print(f"B={b}: AR {row['ar_ms_per_token']:.3f} ms/token, propose {split['propose_ms']:.3f} "
          f"ms, verify {split['verify_ms']:.3f} ms, ideal speedup {ideal:.2f}", flush=True)
    for impl, r in row["loop"].items():
      print(f"  loop[{impl}]: " + (r if isinstance(r, str) else
            f"{r['spec_ms_per_token']:.3f} ms/token, speedup {r['speedup']:.2f}, "
            f"efficiency {r['loop_efficiency']:.2f}"), flush=True)
    for op, times in row["ops_us"].items():
      print(f"  {op}: " + ", ".join(f"{k}={v:.1f} us" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in times.items()), flush=True)
    print("  markov share of a round: " + ", ".join(
        f"{k}={v:.1%}" for k, v in row["markov_share_of_round"].items()), flush=True)
  speculative.ACCEPT_RULES.pop(rule)
  speculative.TREE_ACCEPT_RULES.pop(rule, None)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
  return results


if __name__ == "__main__":
  main()
