"""Throughput benchmark: plain decoding vs transformers, and speculative vs plain decoding.

  python -m dspark_jax.bench --batch_sizes=1,8 --max_new_tokens=64 \
      --drafts=dspark=DIR,dflash=DIR,eagle3=DIR --out=bench_results/bench.json --overwrite

For every batch size B it generates `max_new_tokens` greedy tokens for B prompts (the first
turns of DeepSpec's eval sets when `--eval_dir` exists, else built-in prompts) with

  * ours, plain autoregressive (`generate(draft=None)`), warm (compilation excluded);
  * transformers `model.generate` on the same checkpoint (torch, float32, greedy), unless
    `--skip_hf` or torch is missing;
  * ours, speculative, with a randomly initialised DSpark draft (a lower bound: tau ~ 1) and
    with every draft in `--drafts`.

Ratios are taken within one run on one machine. Every speculative run also checks that its
greedy tokens equal plain greedy (`greedy_equal`). `--repeats` timed runs are made and the
median kept. `--full_vocab_too` adds, for each draft trained over a reduced vocabulary, the
same weights over the full vocabulary (`name@full`).

Where a round's time goes is measured separately, not estimated: the draft's `propose` and
the target's `verify` are each jitted alone in a `fori_loop` of `--split_rounds` calls on a
prefilled batch and timed; `other` = measured round time - propose - verify (accept, commit,
loop overhead). Round and AR step times are wall time / rounds, so they include the
prefill's share. Results go to JSON and a markdown table beside it (`--out`, by default under
the untracked `runs/`); an existing file is replaced only with `--overwrite`. Relative
`--eval_dir` / `--out` paths are taken from the repository root, not the current directory.
"""

from __future__ import annotations

import glob
import os
import sys

import jax
from absl import flags

from dspark_jax import cli
from dspark_jax.engine import profile
from dspark_jax.evaluate import parse_drafts

FLAGS = flags.FlagValues()  # this tool's own (see dspark_jax.cli)
flags.DEFINE_string("target", "smollm2-135m-instruct",
                    "model path, hub id or demo name ('tiny' for a smoke run)", flag_values=FLAGS)
flags.DEFINE_bool("tiny", False, "shorthand for --target=tiny --skip_hf", flag_values=FLAGS)
flags.DEFINE_string("drafts", "", "name=path,... trained drafts (load_draft paths; 'demo' = "
                    "the committed demo draft)", flag_values=FLAGS)
flags.DEFINE_bool("no_random_draft", False, "skip the randomly initialised DSpark draft",
                  flag_values=FLAGS)
flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes to measure", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per row", flag_values=FLAGS)
flags.DEFINE_string("eval_dir", os.path.join("..", "shared", "data", "eval"),
                    "DeepSpec eval sets (*.jsonl) whose first turns are the prompts, relative to "
                    "the repository root; built-in prompts when absent", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "timed runs per measurement (the median is kept)",
                     flag_values=FLAGS)
flags.DEFINE_integer("split_rounds", 16, "rounds of the separately timed propose / verify loops",
                     flag_values=FLAGS)
flags.DEFINE_bool("full_vocab_too", False, "also run every draft trained over a reduced "
                  "vocabulary with the same weights over the full vocabulary (name + '@full'): "
                  "what the reduced vocabulary saves in propose time and costs in tau",
                  flag_values=FLAGS)
flags.DEFINE_bool("skip_hf", False, "skip the transformers baseline", flag_values=FLAGS)
flags.DEFINE_integer("hf_threads", 0, "torch threads (0: torch default)", flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "bench", "bench.json"),
                    "results JSON (a .md table is written beside it), relative to the repository "
                    "root", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace existing output files", flag_values=FLAGS)

BUILTIN_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "What is 17 times 23? Show your steps.",
    "Give three tips for learning a new language.",
    "Write a Python function that reverses a string.",
    "Summarise the plot of Romeo and Juliet.",
    "What causes the seasons on Earth?",
    "List five fruits that are red.",
)


def bench_prompts(tokenizer, eval_dir: str | None, n: int, max_tokens: int = 256):
  """`n` chat-formatted prompts: one per eval domain round-robin, else built-ins."""
  texts: list[str] = []
  files = sorted(glob.glob(os.path.join(eval_dir, "*.jsonl"))) if eval_dir else []
  if files:
    from dspark_jax.training import data as data_lib
    per = [[r["turns"][0] for r in data_lib.read_rows(f)] for f in files]
    i = 0
    while len(texts) < n and any(i < len(p) for p in per):
      texts += [p[i] for p in per if i < len(p)]
      i += 1
  else:
    texts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)]
  ids = []
  for t in texts:
    msg = [{"role": "user", "content": t}]
    x = tokenizer.apply_chat_template(msg) if tokenizer.has_chat_template else tokenizer.encode(t)
    if len(x) <= max_tokens:
      ids.append(x)
  base = ids or [tokenizer.encode(BUILTIN_PROMPTS[0])]  # every prompt too long: a built-in
  return [base[i % len(base)] for i in range(n)]  # too few: cycle


# ---------------------------------------------------------------------------------------------
# transformers baseline
# ---------------------------------------------------------------------------------------------
def hf_generate_tokens_per_s(model_dir: str, prompts, max_new_tokens: int, repeats: int,
                             threads: int | None = None) -> dict:
  """Greedy `transformers` generation (torch CPU float32), forced to `max_new_tokens` tokens."""
  import torch
  import transformers
  if threads:
    torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  b = len(prompts)
  width = max(len(p) for p in prompts)
  pad = model.config.pad_token_id or 0
  ids = torch.full((b, width), pad, dtype=torch.long)
  mask = torch.zeros((b, width), dtype=torch.long)
  for i, p in enumerate(prompts):  # left padding, as decoder-only generation expects
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1

  def run():
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            pad_token_id=pad)

  run()  # warm-up
  secs, out = profile.median_time(run, repeats)
  n = (out.shape[1] - width) * b
  return {"tokens_per_s": n / secs, "wall_s": secs, "tokens": int(n),
          "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def random_like(target, draft):
  """A randomly initialised draft with `draft`'s configuration."""
  from dspark_jax.drafts import api
  d = api.Draft(draft.config, api.build_module(draft.config, draft.dtype, seed=0),
                dtype=draft.dtype)
  d.target = target
  return d


def markdown(results: dict) -> str:
  lines = []
  for bs, r in results["batches"].items():
    lines.append(f"\n**batch {bs}** ({results['setting']})\n")
    lines.append("| decoder | tokens/s | vs ours AR | τ | propose ms | verify ms | other ms |"
                 " greedy equal |")
    lines.append("|---|---|---|---|---|---|---|---|")
    ar = r["ar"]["tokens_per_s"]
    lines.append(f"| ours, autoregressive | {ar:.1f} | 1.00 | – | – | "
                 f"{r['ar']['step_ms']:.1f} (step) | – | – |")
    if r.get("hf"):
      lines.append(f"| transformers generate | {r['hf']['tokens_per_s']:.1f} | "
                   f"{r['hf']['tokens_per_s'] / ar:.2f} | – | – | – | – | – |")
    for name, s in r["spec"].items():
      sp = s.get("split", {})
      f = lambda k: f"{sp[k]:.1f}" if k in sp else "–"
      lines.append(f"| ours, speculative ({name}) | {s['tokens_per_s']:.1f} | "
                   f"{s['speedup_vs_ar']:.2f} | {s['tau']:.2f} | {f('propose_ms')} | "
                   f"{f('verify_ms')} | {f('other_ms')} | {s['greedy_equal']} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  """Runs the benchmark; `argv`: flags without the program name (None = `sys.argv[1:]`)."""
  args = cli.parse(FLAGS, argv, __doc__)
  if args.tiny:
    args.target, args.skip_hf = "tiny", True
  args.eval_dir, args.out = cli.repo_path(args.eval_dir), cli.repo_path(args.out)
  md_path = os.path.splitext(args.out)[0] + ".md"
  cli.check_outputs([args.out, md_path], args.overwrite)
  eval_dir = args.eval_dir if os.path.isdir(args.eval_dir) else None
  if eval_dir is None:
    print(f"no eval sets at {args.eval_dir} (--eval_dir, relative to the repository root): "
          "using built-in prompts", file=sys.stderr)
  import dspark_jax as dj
  from tqdm.auto import tqdm
  target = dj.load_target(args.target)
  trained = {name: dj.load_draft(path, target) for name, path in parse_drafts(args.drafts).items()}
  drafts = {}
  if not args.no_random_draft:
    # Same architecture as the first trained DSpark draft, so the pair isolates training.
    like = next((d for d in trained.values() if d.algorithm == "dspark"), None)
    drafts["random-init dspark"] = random_like(target, like) if like else dj.init_draft(target)
  drafts.update(trained)
  if args.full_vocab_too:
    drafts.update({f"{name}@full": dj.full_vocab(d) for name, d in trained.items()
                   if d.config.draft_vocab_size})
  sizes = [int(s) for s in args.batch_sizes if s]
  all_prompts = bench_prompts(target.tokenizer, eval_dir, max(sizes))
  # Rows stop only at the length limit, so every decoder produces the same token count.
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_tokens=[])
  results = {"target": args.target, "device": str(jax.devices()[0].device_kind),
             "backend": jax.default_backend(), "jax": jax.__version__,
             "setting": f"greedy, float32, {args.max_new_tokens} new tokens/row, "
                        f"median of {args.repeats}",
             "prompts": "eval sets" if eval_dir else "built-in", "args": vars(args),
             "batches": {}}
  bar = tqdm(total=len(sizes) * (1 + len(drafts) + (not args.skip_hf)), desc="bench",
             unit="run")
  for bs in sizes:
    prompts = all_prompts[:bs]
    # Speculative rows verify all P drafts every round (scheduling: dspark_jax.schedule_bench).
    gen = lambda d=None: dj.generate(target, prompts, draft=d, batch_size=bs,
                                     scheduler="fixed" if d is not None else None, **kw)
    gen()  # compile
    secs, ar = profile.median_time(gen, args.repeats)
    n_tok = sum(ar.stats.num_tokens)
    r = {"ar": {"tokens_per_s": n_tok / secs, "wall_s": secs, "tokens": n_tok,
                "step_ms": 1e3 * secs / max(ar.stats.rounds)}, "spec": {}}
    bar.update(1)
    if not args.skip_hf:
      try:
        r["hf"] = hf_generate_tokens_per_s(target.path, prompts, args.max_new_tokens,
                                           args.repeats, args.hf_threads or None)
        r["hf"]["vs_ours_ar"] = r["hf"]["tokens_per_s"] / r["ar"]["tokens_per_s"]
      except ImportError as e:
        r["hf"] = None
        print(f"transformers baseline skipped: {e}", file=sys.stderr)
      bar.update(1)
    for name, d in drafts.items():
      gen(d)  # compile
      secs, res = profile.median_time(lambda: gen(d), args.repeats)
      n_tok = sum(res.stats.num_tokens)
      rounds = max(res.stats.rounds)
      s = {"tokens_per_s": n_tok / secs, "wall_s": secs, "tokens": n_tok, "tau": res.stats.tau,
           "rounds": rounds, "round_ms": 1e3 * secs / rounds, "block": d.config.block_size,
           "speedup_vs_ar": (n_tok / secs) / r["ar"]["tokens_per_s"],
           "greedy_equal": res.tokens == ar.tokens}
      sp = profile.round_split(target, d, prompts, args.split_rounds)
      sp["other_ms"] = s["round_ms"] - sp["propose_ms"] - sp["verify_ms"]
      s["split"] = sp
      r["spec"][name] = s
      bar.update(1)
    results["batches"][str(bs)] = r
  bar.close()
  results["table"] = markdown(results)
  cli.write_json(args.out, results, table=results["table"])  # the .md beside it too
  print(f"wrote {args.out}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
