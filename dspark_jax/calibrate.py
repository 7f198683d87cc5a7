r"""Sequential Temperature Scaling (STS) of a DSpark draft's confidence head.

  python -m dspark_jax.calibrate --target=smollm2-135m-instruct --draft=DIR \
      --prompts=../shared/data/train/gsm8k_train.jsonl --num_prompts=64 --holdout=0.5 \
      --max_new_tokens=64 --temperature=1.0 --out_dir=DIR

It renders the first turn of `--num_prompts` prompts with the target's chat template, splits
them (seeded shuffle) into a fit split and a held-out split of `--holdout` of them, runs
fixed-length speculative decoding (`scheduler="fixed"`: every round verifies all P drafts, so
every position gets a label) at the serving temperature, fits one temperature per draft
position on the fit split (`fit_sts`: left to right, ECE of the cumulative product against the
realised prefix bits) and reports ECE / AUROC / Brier before and after on the held-out split.

Outputs, in `--out_dir` (default: the draft directory itself): `sts.json` (temperatures,
metrics, what they were fitted on) and `reliability.png` (per position, reliability before and
after, like the paper's Fig. 6). Existing files are replaced only with `--overwrite`; writing
into the installed package (the committed demo draft under `dspark_jax/assets`) also needs
`--write_into_package`. The per-position table goes to stdout, progress to stderr. Relative
`--prompts` / `--out_dir` paths are taken from the repository root. Prompts from the shared
evaluation sets (`../shared/data/eval`) are refused: calibrating on them would leak into the
numbers reported on them.

Labels (see `round_labels`): the rollouts are generated without stop tokens in the loop
so that every recorded round length is the exact accepted count, then cut at the first stop
token of each row, as DeepSpec's recorder truncates the effective proposal at an accepted EOS.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from absl import flags

from dspark_jax import cli
from dspark_jax.drafts import sts as sts_lib
from dspark_jax.scheduling import calibration

PACKAGE_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
EVAL_DATA_DIR = os.path.join("..", "shared", "data", "eval")  # relative to the repository root
RELIABILITY_FILE = "reliability.png"

FLAGS = flags.FlagValues()  # this tool's own (see dspark_jax.cli)
flags.DEFINE_string("target", "smollm2-135m-instruct", "model path, hub id or demo name",
                    flag_values=FLAGS)
flags.DEFINE_string("draft", "", "draft directory to calibrate (a load_draft path; 'demo' = the "
                    "committed demo draft); required", flag_values=FLAGS)
flags.DEFINE_string("prompts", os.path.join("..", "shared", "data", "train", "gsm8k_train.jsonl"),
                    "prompt JSONL (any format read_rows reads; first turns are used), relative "
                    "to the repository root; never an eval set", flag_values=FLAGS)
flags.DEFINE_integer("num_prompts", 64, "prompts used in all (fit + held out)", flag_values=FLAGS)
flags.DEFINE_float("holdout", 0.5, "fraction of the prompts held out for the before/after report",
                   flag_values=FLAGS)
flags.DEFINE_integer("max_prompt_tokens", 512, "skip prompts longer than this (chat-formatted)",
                     flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per prompt", flag_values=FLAGS)
flags.DEFINE_float("temperature", 1.0, "sampling temperature of the rollouts (the serving one; "
                   "0 = greedy)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the prompt split and of the sampling", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "rows per generate batch", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "", "where sts.json and reliability.png go (default: the draft "
                    "directory), relative to the repository root", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an existing sts.json / reliability.png",
                  flag_values=FLAGS)
flags.DEFINE_bool("write_into_package", False, "allow --out_dir inside the installed package's "
                  "assets (the committed demo draft)", flag_values=FLAGS)


# ---------------------------------------------------------------------------------------------
# rollouts -> labels
# ---------------------------------------------------------------------------------------------
def round_labels(out_tokens: Sequence[int], accept_lengths: Sequence[int],
                 verify_lengths: Sequence[int], stop_ids: Sequence[int]
                 ) -> list[tuple[int, int, int]]:
  """Which rounds of one row are calibration samples, and their labels.

  The row must come from `generate(..., stop_tokens=[])` (no stop token in the loop): then every
  recorded round length is `n_acc + 1` exactly (the engine records the committed count before
  the `max_new_tokens` cut), and the output is `[first] + the rounds' commits`, cut at
  `max_new_tokens`. Rules:

  * rounds after the row's first stop token in `stop_ids` are dropped: a serving run (with
    stop tokens) would have ended there;
  * in the round that produced that stop (offset `j` in its commit): if the stop is an
    accepted draft (`j < n_acc`) the effective length is `j + 1` (positions after it were
    judged on post-EOS context; DeepSpec's `effective_proposal_length`), all accepted; if it is
    the bonus / correction token (`j == n_acc`) the round is fully observed;
  * a first token (the prefill sample) that is a stop leaves no rounds;
  * every other round is fully observed, the last one included even when `max_new_tokens`
    cut its commit: its verification was complete and its count exact, and dropping it would
    drop rounds *because* they accepted many tokens (the round that crosses the limit);
  * rounds that verified nothing (`verify_len == 0`) are skipped.

  Args:
    out_tokens: the row's new tokens (`GenerationResult.tokens[i]`).
    accept_lengths: committed tokens per round (`stats.accept_lengths[i]`).
    verify_lengths: drafts verified per round (`stats.verify_lengths[i]`).
    stop_ids: the serving stop tokens.

  Returns:
    `[(round, accepted, n_eff)]` with `0 <= accepted <= n_eff <= verify_len`: the prefix bit of
    position k (0-based) is `k < accepted`, observed for `k < n_eff`.
  """
  stops = set(int(s) for s in stop_ids)
  first_stop = next((t for t, tok in enumerate(out_tokens) if int(tok) in stops), None)
  if first_stop == 0:
    return []
  samples = []
  start = 1  # out_tokens[0] is the prefill sample
  for r, (a, ver) in enumerate(zip(accept_lengths, verify_lengths)):
    n_acc, ver = int(a) - 1, int(ver)
    if not 0 <= n_acc <= ver:
      raise ValueError(f"round {r}: {a} committed tokens with {ver} drafts verified")
    j = None if first_stop is None else first_stop - start  # >= 0: earlier rounds had none
    if j is not None and j <= n_acc:  # this round produced the first stop
      n_eff = ver if j == n_acc else j + 1
      accepted = n_acc if j == n_acc else j + 1
      if n_eff > 0:
        samples.append((r, accepted, n_eff))
      break
    if ver > 0:
      samples.append((r, n_acc, ver))
    start += n_acc + 1
  return samples


def rollouts_from_result(result, num_positions: int, stop_ids: Sequence[int]):
  """Calibration arrays of a `generate(..., draft=..., stop_tokens=[])` result.

  Args:
    result: the `GenerationResult` (speculative, with per-round confidence logits).
    num_positions: P, the draft block used.
    stop_ids: the serving stop tokens (rows are cut at the first one, `round_labels`).

  Returns:
    (logits `[N, P]` float64 raw confidence logits, prefix_accepted `[N, P]` bool,
    valid `[N, P]` bool observed positions, index `[N, 2]` int (row, round) of each sample),
    rows in prompt order, rounds in order.
  """
  st = result.stats
  if st.accept_lengths is None or st.confidence_logits is None:
    raise ValueError("need a speculative generate result (draft=...) with confidence logits")
  logits, accepted, n_eff, index = [], [], [], []
  for i, toks in enumerate(result.tokens):
    conf = st.confidence_logits[i]
    for r, acc, n in round_labels(toks, st.accept_lengths[i], st.verify_lengths[i], stop_ids):
      logits.append(conf[r])
      accepted.append(acc)
      n_eff.append(n)
      index.append((i, r))
  z = np.asarray(logits, np.float64).reshape(-1, num_positions)
  y, valid = calibration.prefix_labels(np.asarray(accepted, np.int64),
                                       np.asarray(n_eff, np.int64), num_positions)
  return z, y, valid, np.asarray(index, np.int64).reshape(-1, 2)


def collect_rollouts(target, draft, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                     seed: int = 0, batch_size: int = 8, stop_tokens: Sequence[int] | None = None,
                     progress: bool = False):
  """Fixed-length speculative rollouts of `prompts`, as STS inputs.

  Every round verifies all P drafts (`scheduler="fixed"`), so every position is labelled;
  pruned rollouts would censor the labels. The loop runs without stop tokens and the rows are
  cut at the first stop token afterwards (`round_labels`), so the round that produced the stop
  has an exact accepted count; generation past a stop is wasted work, not data.

  Args:
    target: the target.
    draft: a draft with a confidence head.
    prompts: strings or token-id lists (as for `generate`).
    max_new_tokens: tokens generated per prompt.
    temperature: sampling temperature (the serving one).
    seed: sampling seed.
    batch_size: rows per device batch.
    stop_tokens: serving stop ids (default the target's `stop_token_ids`).
    progress: progress bar over batches (stderr).

  Returns:
    (logits `[N, P]` float64, prefix_accepted `[N, P]` bool, valid `[N, P]` bool) over the
    `N` kept rounds of all prompts.
  """
  from dspark_jax.generation import generate
  if not getattr(draft.config, "confidence_head", False):
    raise ValueError(f"this {draft.config.algorithm} draft has no confidence head: nothing to "
                     "calibrate")
  stops = list(target.stop_token_ids) if stop_tokens is None else [int(s) for s in stop_tokens]
  res = generate(target, prompts, draft=draft, max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed, batch_size=batch_size, stop_tokens=[],
                 scheduler="fixed", progress=progress)
  z, y, valid, _ = rollouts_from_result(res, draft.config.block_size, stops)
  return z, y, valid


# ---------------------------------------------------------------------------------------------
# fit + report
# ---------------------------------------------------------------------------------------------
def _log(msg: str, verbose: bool) -> None:
  if verbose:
    print(msg, file=sys.stderr, flush=True)


def calibrate(target, draft, fit_prompts, eval_prompts, *, max_new_tokens: int = 64,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 8, grid=None,
              stop_tokens: Sequence[int] | None = None, out_dir: str | None = None,
              data: dict | None = None, verbose: bool = False) -> dict:
  """Fits STS on `fit_prompts`' rollouts and reports before / after on `eval_prompts`'.

  Args:
    target: the target.
    draft: a draft with a confidence head (its raw logits are calibrated; temperatures it
      already carries are ignored).
    fit_prompts: prompts whose rollouts the temperatures are fitted on.
    eval_prompts: held-out prompts (disjoint from `fit_prompts`) for the report.
    max_new_tokens / temperature / batch_size / stop_tokens: as for `collect_rollouts`.
    seed: sampling seed of the fit rollouts; the held-out ones use `seed + 1`, so that the two
      splits never share a random stream (streams are keyed by (seed, request id, step)).
    grid: STS temperature grid (default `calibration.DEFAULT_STS_GRID`, 0.50..5.00).
    out_dir: if given, writes `sts.json` and `reliability.png` there.
    data: extra fields for the file's "fitted_on" record (e.g. the prompts file).
    verbose: progress messages and bars on stderr.

  Returns:
    dict: "temperatures" `[P]`; "before" / "after": `calibration_report`s of the held-out
    split (raw head / with the temperatures); "fit_after": the in-sample report of the fit
    split; "fitted_on": the data record; "files": paths written (with `out_dir`).

  Raises:
    ValueError: a draft without a confidence head, or a split without any rounds.
  """
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
            stop_tokens=stop_tokens, progress=verbose)
  _log(f"fit split: rollouts of {len(fit_prompts)} prompts", verbose)
  zf, yf, vf = collect_rollouts(target, draft, fit_prompts, seed=seed, **kw)
  _log(f"held-out split: rollouts of {len(eval_prompts)} prompts", verbose)
  ze, ye, ve = collect_rollouts(target, draft, eval_prompts, seed=seed + 1, **kw)
  for name, z in (("fit", zf), ("held-out", ze)):
    if z.shape[0] == 0:
      raise ValueError(f"the {name} split produced no calibration rounds (every row stopped "
                       "at once?)")
  _log(f"fitting STS on {zf.shape[0]} rounds; reporting on {ze.shape[0]} held-out rounds",
       verbose)
  temps = calibration.fit_sts(zf, yf, valid=vf, grid=grid)
  prior = calibration.prior_confidence(yf, vf)
  before = calibration.calibration_report(ze, ye, None, valid=ve)
  after = calibration.calibration_report(ze, ye, temps, valid=ve)
  g = calibration.DEFAULT_STS_GRID if grid is None else np.unique(np.asarray(grid, np.float64))
  record = dict(data or {})
  record.update(
      num_fit_prompts=len(fit_prompts), num_eval_prompts=len(eval_prompts),
      fit_rounds=int(zf.shape[0]), eval_rounds=int(ze.shape[0]),
      fit_count=[int(c) for c in vf.sum(axis=0)], max_new_tokens=int(max_new_tokens),
      temperature=float(temperature), seed=int(seed), num_positions=int(zf.shape[1]),
      grid={"min": float(g[0]), "max": float(g[-1]), "size": int(g.size)},
      scheduler="fixed", labels="prefix bits of fixed-length rounds, cut at the first stop token")
  out = {"temperatures": [float(t) for t in temps], "prior": [float(c) for c in prior],
         "before": before, "after": after,
         "fit_after": calibration.calibration_report(zf, yf, temps, valid=vf),
         "fitted_on": record, "files": {}}
  if out_dir is not None:
    out["files"]["sts"] = sts_lib.write_sts(out_dir, temps, report_before=before,
                                            report_after=after, data=record,
                                            prior=prior)
    png = os.path.join(os.fspath(out_dir), RELIABILITY_FILE)
    try:
      calibration.reliability_diagram(ze, ye, temps, png, valid=ve)
      out["files"]["reliability"] = png
    except ImportError:
      print("matplotlib is not installed: no reliability diagram (pip install matplotlib)",
            file=sys.stderr)
  return out


def _pct(x) -> str:
  return "   n/a" if x is None or not np.isfinite(x) else f"{100 * x:5.1f}%"


def _num(x) -> str:
  return "  n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def format_table(result: dict) -> str:
  """The per-position table of a `calibrate` result (held-out split)."""
  b, a = result["before"], result["after"]
  lines = ["held-out split: cumulative confidence vs realised prefix acceptance",
           f"{'pos':>3}  {'T':>5}  {'ECE raw -> STS':>16}  {'AUROC raw / STS':>15}  "
           f"{'Brier raw -> STS':>16}  {'rounds':>6}  {'prior':>5}"]
  prior = result.get("prior") or [float("nan")] * len(result["temperatures"])
  for k, t in enumerate(result["temperatures"]):
    lines.append(f"{k + 1:>3}  {t:5.2f}  {_pct(b['ece'][k]):>7} -> {_pct(a['ece'][k]):>6}  "
                 f"{_num(b['auroc'][k]):>6} / {_num(a['auroc'][k]):>6}  "
                 f"{_num(b['brier'][k]):>7} -> {_num(a['brier'][k]):>6}  {a['count'][k]:>6}  "
                 f"{_num(prior[k]):>5}")
  sb, sa = b["summary"], a["summary"]
  lines.append(f"{'all':>3}  {'':>5}  {_pct(sb['ece']):>7} -> {_pct(sa['ece']):>6}  "
               f"{_num(sb['auroc']):>6} / {_num(sa['auroc']):>6}  "
               f"{_num(sb['brier']):>7} -> {_num(sa['brier']):>6}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _inside(path: str, root: str) -> bool:
  path, root = os.path.realpath(path), os.path.realpath(root)
  return os.path.commonpath([path, root]) == root


def load_prompts(path: str, tokenizer, n: int, max_tokens: int) -> list[list[int]]:
  """The first `n` first-turn prompts of `path` (chat-formatted) of at most `max_tokens`."""
  from dspark_jax.training import data as data_lib
  out, limit = [], 4 * n
  while True:
    rows = data_lib.read_rows(path, limit=limit)
    out = []
    for row in rows:
      ids = tokenizer.apply_chat_template([{"role": "user", "content": row["turns"][0]}])
      if len(ids) <= max_tokens:
        out.append(list(ids))
      if len(out) == n:
        return out
    if len(rows) < limit:  # the whole file was read
      return out
    limit *= 4


def split_prompts(prompts: list, holdout: float, seed: int) -> tuple[list, list]:
  """Seeded shuffle, then (fit, held out) with `round(holdout * n)` (>= 1 each) held out."""
  n = len(prompts)
  if not 0.0 < holdout < 1.0:
    raise SystemExit(f"error: --holdout must lie in (0, 1), got {holdout}")
  if n < 2:
    raise SystemExit(f"error: need at least 2 prompts to split, got {n}")
  n_eval = min(max(int(round(holdout * n)), 1), n - 1)
  order = np.random.default_rng(seed).permutation(n)
  return ([prompts[i] for i in order[n_eval:]], [prompts[i] for i in order[:n_eval]])


def main(argv=None) -> dict:
  """Runs the calibration; `argv`: flags without the program name (None = `sys.argv[1:]`)."""
  args = cli.parse(FLAGS, argv, __doc__)
  if not args.draft:
    raise SystemExit("error: --draft is required (the draft directory to calibrate)")
  args.prompts = cli.repo_path(args.prompts)
  if _inside(args.prompts, cli.repo_path(EVAL_DATA_DIR)):
    raise SystemExit(f"error: {args.prompts} is an evaluation set; fit STS on training prompts "
                     "(the default is the GSM8K train file)")
  if not os.path.isfile(args.prompts):
    raise SystemExit(f"error: no prompt file {args.prompts!r} (--prompts; a relative path starts "
                     f"at the repository root {cli.REPO_ROOT})")
  import dspark_jax as dj
  from dspark_jax.drafts.checkpoint import resolve_draft_path
  _log(f"loading target {args.target}", True)
  target = dj.load_target(args.target)
  draft_dir = resolve_draft_path(args.draft, target)
  out_dir = cli.repo_path(args.out_dir) if args.out_dir else draft_dir
  if _inside(out_dir, PACKAGE_ASSETS) and not args.write_into_package:
    raise SystemExit(f"error: {out_dir} is inside the installed package; pass --out_dir=DIR, "
                     "or --write_into_package to update the committed draft")
  outputs = [sts_lib.sts_path(out_dir), os.path.join(out_dir, RELIABILITY_FILE)]
  cli.check_outputs(outputs, args.overwrite)
  _log(f"loading draft {draft_dir}", True)
  draft = dj.load_draft(draft_dir, target)
  if target.tokenizer is None:
    raise SystemExit(f"error: target {args.target} has no tokenizer (needed for the chat "
                     "template)")
  prompts = load_prompts(args.prompts, target.tokenizer, args.num_prompts, args.max_prompt_tokens)
  if len(prompts) < args.num_prompts:
    _log(f"only {len(prompts)} prompts of <= {args.max_prompt_tokens} tokens in {args.prompts}",
         True)
  fit, held = split_prompts(prompts, args.holdout, args.seed)
  data = dict(prompts=args.prompts, target=args.target, draft=draft_dir, holdout=args.holdout,
              max_prompt_tokens=args.max_prompt_tokens)
  result = calibrate(target, draft, fit, held, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                     out_dir=out_dir, data=data, verbose=True)
  print(format_table(result))
  for path in result["files"].values():
    _log(f"wrote {path}", True)
  return result


if __name__ == "__main__":
  main()
