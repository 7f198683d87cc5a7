"""Draft-training data: prompts -> target-regenerated chats -> masked tokens -> fixed-shape batches.

The four stages are plain functions so `train.py` (and users) can run any of them alone:

1. Prompt sources: `read_rows` (DeepSpec eval/train JSONL, ShareGPT/OpenAI conversations,
   GSM8K, `{"prompt"}`) and `stdlib_code_prompts` (code prompts mined from the Python
   standard library's own sources, so a demo needs no downloaded data set).
2. `regenerate`: the target answers every user turn itself (DeepSpec trains the draft on the
   target's own samples), written to JSONL incrementally and resumably.
3. `tokenize_conversation` / `tokenize_file`: the tokenizer's chat template, an
   assistant-only loss mask (assistant body + its end-of-turn marker), one `.npz`.
4. `BatchIterator`: shuffled fixed-shape `[B, S]` batches whose position is a tiny dict, so a
   restored run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import random
import re
import sysconfig
import textwrap
import time
import warnings
import zipfile
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

# DeepSpec's role mapping (scripts/data/download_and_split.py); other roles are dropped.
_USER_ROLES = {"user": "user", "human": "user"}
_ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
                    "bing": "assistant", "bard": "assistant", "model": "assistant"}


class DataFormatError(ValueError):
  """A data file row that cannot be understood (the message names file:line)."""


class TemplateMismatchError(ValueError):
  """The chat template rendered an assistant message so that it cannot be located."""


# =============================================================================================
# 1. Prompt sources
# =============================================================================================
def _message_role_content(msg: Any, where: str) -> tuple[str, str]:
  """(role, content) of an OpenAI-style {"role","content"} or ShareGPT {"from","value"} message."""
  if not isinstance(msg, dict):
    raise DataFormatError(f"{where}: a message must be an object, got {type(msg).__name__}")
  role = msg.get("role", msg.get("from"))
  content = msg.get("content", msg.get("value"))
  if not isinstance(role, str):
    raise DataFormatError(f"{where}: message without a string 'role' (or 'from'): {msg!r:.200}")
  if content is None:
    content = ""
  if not isinstance(content, str):
    raise DataFormatError(f"{where}: message content must be a string, got "
                          f"{type(content).__name__} (multimodal content is not supported)")
  return role.lower(), content


def normalize_messages(messages: Any, where: str = "<messages>",
                       keep_system: bool = True) -> list[dict]:
  """Maps roles to user/assistant(/system) as DeepSpec does and drops every other role.

  Args:
    messages: list of {"role","content"} or {"from","value"} dicts.
    where: location used in error messages ("file:line").
    keep_system: keep "system" messages (only meaningful as the first message).

  Returns:
    list of {"role": "user"|"assistant"|"system", "content": str}.
  """
  if not isinstance(messages, list):
    raise DataFormatError(f"{where}: 'conversations' must be a list, got "
                          f"{type(messages).__name__}")
  out = []
  for j, msg in enumerate(messages):
    role, content = _message_role_content(msg, f"{where} message {j}")
    if role in _USER_ROLES:
      out.append({"role": "user", "content": content})
    elif role in _ASSISTANT_ROLES:
      out.append({"role": "assistant", "content": content})
    elif role == "system" and keep_system and not out:
      out.append({"role": "system", "content": content})
  return out


def _row_turns(row: Any, where: str) -> list[str] | None:
  """User turns of one input row, or None for a well-formed row without user turns."""
  if not isinstance(row, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "turns" in row:
    turns = row["turns"]
    if isinstance(turns, str):
      turns = [turns]
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
      raise DataFormatError(f"{where}: 'turns' must be a list of strings")
  elif "conversations" in row or "messages" in row:
    msgs = normalize_messages(row.get("conversations", row.get("messages")), where)
    turns = [m["content"] for m in msgs if m["role"] == "user"]
  elif "question" in row:  # GSM8K
    if not isinstance(row["question"], str):
      raise DataFormatError(f"{where}: 'question' must be a string")
    turns = [row["question"]]
  elif "prompt" in row:
    turns = row["prompt"]
    turns = [turns] if isinstance(turns, str) else turns
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
      raise DataFormatError(f"{where}: 'prompt' must be a string or a list of strings")
  else:
    raise DataFormatError(
        f"{where}: unknown row format (keys {sorted(row)[:8]}); expected 'turns', "
        f"'conversations' / 'messages', 'question' (GSM8K) or 'prompt'")
  return turns or None


def read_rows(path: str | os.PathLike, limit: int = 0) -> list[dict]:
  """Reads prompts from a JSONL file in any of the formats DeepSpec's data uses.

  Accepted rows (one JSON object per line; blank lines are skipped):
    `{"turns": [user turns...]}` (DeepSpec eval files), `{"conversations": [...]}` or
    `{"messages": [...]}` with `role/content` or ShareGPT `from/value` messages (assistant
    turns are discarded: they get regenerated; roles other than human/user and
    gpt/chatgpt/bing/bard/assistant are dropped, as DeepSpec does), GSM8K
    `{"question", "answer"}` (the question), `{"prompt": str | [str]}`.

  Args:
    path: the JSONL file.
    limit: stop after this many rows (0 = all).

  Returns:
    `[{"id": row id (the row's own "id" if any, else its 0-based row number), "turns":
    [user strings]}]`. Conversations without any user turn are skipped with a warning.

  Raises:
    DataFormatError: a malformed line or row, or a duplicate id (with file:line).
  """
  path = os.fspath(path)
  rows, seen, skipped = [], {}, 0
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if limit and len(rows) >= limit:
        break
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      turns = _row_turns(row, where)
      if turns is None:
        skipped += 1
        continue
      rid = row.get("id", len(rows) + skipped)
      if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataFormatError(f"{where}: 'id' must be a string or an integer, got {rid!r:.80}")
      if str(rid) in seen:
        raise DataFormatError(f"{where}: duplicate id {rid!r} (first at line {seen[str(rid)]})")
      seen[str(rid)] = lineno
      rows.append({"id": rid, "turns": turns})
  if skipped:
    warnings.warn(f"{path}: skipped {skipped} rows without a user turn")
  return rows


# Directories of the standard library that are tests, demos, tooling or vendored code.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                     "turtledemo", "ensurepip", "pydoc_data", "__pycache__", "encodings",
                     "__phello__", "venv", "msilib"}

_CODE_VARIANTS = (
    "Write a Python {kind} `{sig}` that does the following: {summary}",
    "Explain what this Python {kind} does:\n```python\n{source}\n```",
    "Complete this Python {kind}:\n```python\n{stub}\n```",
    "Implement the Python {kind} `{sig}` described by this docstring:\n\"\"\"\n{doc}\n\"\"\"",
    "Write unit tests with `unittest` for this {kind} from the `{module}` module:\n"
    "```python\n{source}\n```",
    "Review this Python code and suggest improvements:\n```python\n{source}\n```",
)


def _stdlib_files(root: str) -> list[str]:
  files = []
  for d, dirs, names in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith("test")
                     and not x.startswith("config-"))
    files += [os.path.join(d, n) for n in sorted(names)
              if n.endswith(".py") and not n.startswith(("test_", "_"))]
  return sorted(files)


def _first_sentence(doc: str) -> str:
  para = " ".join(doc.strip().split("\n\n")[0].split())
  m = re.match(r"(.+?[.!?])(\s|$)", para)
  return (m.group(1) if m else para).strip()


def _function_candidates(path: str, root: str, max_lines: int, max_chars: int) -> list[dict]:
  """Public documented top-level functions and methods of top-level classes of one file."""
  try:
    with open(path, encoding="utf-8") as f:
      src = f.read()
    tree = ast.parse(src)
  except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
    return []
  lines = src.splitlines(keepends=True)
  module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
  module = module[:-len(".__init__")] if module.endswith(".__init__") else module
  found = []

  def visit(node, cls):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      return
    if node.name.startswith("_") or (cls and cls.startswith("_")):
      return  # private and dunder: little to say, often trivial
    doc = ast.get_docstring(node)
    if not doc or len(doc) < 20:
      return
    if node.end_lineno - node.lineno + 1 > max_lines:
      return
    # Whole lines, dedented (`ast.get_source_segment` re-splits the file on every call, which
    # is quadratic over a large module).
    source = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
    if len(source) > max_chars:
      return
    summary = _first_sentence(doc)
    if len(summary) < 12 or len(summary) > 300:
      return
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    header = f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"
    doc_lines = inspect.cleandoc(doc)
    stub = f"{header}\n" + textwrap.indent(f'"""{doc_lines}\n"""', "    ")
    qual = f"{cls}.{node.name}" if cls else node.name
    found.append(dict(module=module, qualname=qual, kind="method" if cls else "function",
                      sig=f"{qual}({ast.unparse(node.args)})", summary=summary, doc=doc_lines,
                      source=source.rstrip(), stub=stub))

  for node in tree.body:
    if isinstance(node, ast.ClassDef):
      for sub in node.body:
        visit(sub, node.name)
    else:
      visit(node, None)
  return found


def synthetic_prompts(n: int, seed: int = 0) -> list[dict]:
  """`n` short deterministic prompts (arithmetic, counting, spelling) for tiny smoke runs.

  Char-level tiny tokenizers make real prompts hundreds of tokens long; these stay < 40 chars.
  """
  rng = random.Random(seed)
  words = ["cat", "tree", "river", "jax", "prime", "cloud", "seven", "apple", "block", "draft"]
  out = []
  for i in range(n):
    kind = i % 4
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    w = rng.choice(words)
    if kind == 0:
      text = f"What is {a} + {b}?"
    elif kind == 1:
      text = f"Count from {a % 10} to {a % 10 + 5}."
    elif kind == 2:
      text = f"Spell {w} backwards."
    else:
      text = f"Is {a} larger than {b}?"
    out.append({"id": f"synthetic-{seed}-{i}", "turns": [text]})
  return out


def stdlib_code_prompts(n: int, seed: int = 0, *, max_per_file: int = 3, max_lines: int = 40,
                        max_chars: int = 1600) -> list[dict]:
  """Code prompts mined from the Python standard library's own sources (no download needed).

  Recipe: list the `.py` files under `sysconfig.get_paths()["stdlib"]` (sorted; skipping
  tests, demos, idlelib/lib2to3, encodings, site-packages and private modules), shuffle them
  with `random.Random(seed)`, parse each with `ast` and keep public (no leading underscore),
  documented (docstring >= 20 chars) top-level functions and methods of top-level classes whose
  source is at most `max_lines` lines / `max_chars` characters. Up to `max_per_file` functions
  per file (for variety), each turned into one prompt from a randomly chosen template:
  "Write a Python function `name(args)` that does the following: <first docstring
  sentence>", "Explain what this Python function does: <source>", "Complete this Python
  function: <signature + docstring>", "Implement ... described by this docstring",
  "Write unit tests ...", "Review this Python code ...". Identical prompts are dropped. If the
  first pass yields fewer than `n`, the remaining functions follow, then further (unused)
  templates of every function: about 3k distinct functions, up to ~17k prompts.

  The result depends only on `seed` and the interpreter's standard library.

  Args:
    n: number of prompts wanted (fewer are returned, with a warning, if the stdlib runs out).
    seed: shuffling / template seed.
    max_per_file, max_lines, max_chars: limits described above.

  Returns:
    `[{"id": "stdlib-<seed>-<i>", "turns": [prompt]}]`.
  """
  if n <= 0:
    return []
  root = sysconfig.get_paths()["stdlib"]
  rng = random.Random(seed)
  files = _stdlib_files(root)
  rng.shuffle(files)
  prompts: list[str] = []
  seen: set[str] = set()
  visited: list[dict] = []  # every candidate met, in visiting order

  def add(c) -> bool:
    """One more prompt from `c` with a template not yet used for it; True when n are made."""
    unused = [v for v in range(len(_CODE_VARIANTS)) if v not in c.setdefault("used", set())]
    if not unused:
      return False
    v = rng.choice(unused)
    c["used"].add(v)
    text = _CODE_VARIANTS[v].format(**c)
    if text not in seen:
      seen.add(text)
      prompts.append(text)
    return len(prompts) >= n

  # Pass 1 parses files lazily (a small n touches a few files), <= max_per_file per file.
  done = False
  for path in files:
    cands = _function_candidates(path, root, max_lines, max_chars)
    rng.shuffle(cands)
    visited += cands
    if any(add(c) for c in cands[:max_per_file]):
      done = True
      break
  # Then the remaining functions, then further templates of every function.
  rounds = [[c for c in visited if not c.get("used")]] + [visited] * len(_CODE_VARIANTS)
  for todo in ([] if done else rounds):
    if any(add(c) for c in todo):
      break
  if len(prompts) < n:
    warnings.warn(f"the standard library gave only {len(prompts)} code prompts (asked for {n})")
  return [{"id": f"stdlib-{seed}-{i}", "turns": [p]} for i, p in enumerate(prompts)]


# =============================================================================================
# 2. Regeneration with the target
# =============================================================================================
def _error_path(out_path: str) -> str:
  root = out_path[:-len(".jsonl")] if out_path.endswith(".jsonl") else out_path
  return root + "_error.jsonl"


def _scan_jsonl_ids(path: str, repair: bool) -> set[str]:
  """Ids of the complete rows of a JSONL output file.

  An unterminated or unparsable *last* line is what a killed writer leaves behind: with
  `repair` it is cut off so that appending continues on a clean line boundary.
  """
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  ids, pos, lineno = set(), 0, 0
  good_end = 0
  while pos < len(data):
    nl = data.find(b"\n", pos)
    lineno += 1
    end = len(data) if nl < 0 else nl + 1
    line = data[pos:end]
    last = end >= len(data)
    try:
      if nl < 0:
        raise ValueError("unterminated line")
      if line.strip():
        ids.add(str(json.loads(line)["id"]))
      good_end = end
    except (ValueError, KeyError, TypeError) as e:
      if not last:
        raise DataFormatError(f"{path}:{lineno}: corrupt row in the middle of the file "
                              f"({e}); fix or delete the file") from None
      if repair:
        with open(path, "r+b") as f:
          f.truncate(good_end)
    pos = end
  return ids


def _strip_stop_text(text: str, stop_texts: Sequence[str]) -> str:
  changed = True
  while changed and text:
    changed = False
    for s in stop_texts:
      if s and text.endswith(s):
        text = text[:-len(s)]
        changed = True
  return text


def _request_id(row_id, turn: int) -> int:
  # A row's sampling stream depends on (seed, id, turn) only, so a resumed run (whose chunks
  # are composed differently) samples exactly what an uninterrupted one would.
  return zlib.crc32(f"{row_id}\x00{turn}".encode()) & 0x7FFFFFFF


_DEFAULT_TEMPLATE_KWARGS = {"enable_thinking": False}


def regenerate(target, rows: Sequence[dict], out_path: str | os.PathLike, *, max_new_tokens: int,
               temperature: float = 0.7, top_p: float = 0.8, top_k: int = 20,
               batch_size: int = 16, seed: int = 0, system_prompt: str | None = None,
               progress: bool = True, chunk_size: int | None = None,
               chat_template_kwargs: dict | None = _DEFAULT_TEMPLATE_KWARGS,
               max_context_tokens: int | None = None) -> str:
  """Answers every user turn with the target itself (DeepSpec's `generate_train_data.py`).

  For each row, turn k is answered given the history (user 1, answer 1, ..., user k), all
  answers being the target's own. Work is batched across rows: pending rows are sorted by
  first-turn length (less padding), cut into chunks of `chunk_size` rows, and within a
  chunk turn 1 of every row is generated by one `dspark_jax.generate` call, then turn 2 of
  the rows that have one, and so on. Each finished chunk is appended to `out_path` and
  flushed, so a killed run loses at most one chunk: rerunning skips the ids already in the
  file (a partially written last line is cut off first).

  Sampling defaults are DeepSpec's (Qwen3 non-thinking recommendation) and so is
  `chat_template_kwargs={"enable_thinking": False}` (ignored by templates without that
  switch). A row's random stream depends on (seed, id, turn) only.

  A turn whose prompt leaves no room in the cache (model max positions, or
  `max_context_tokens`) ends its conversation early; rows that could not produce any answer
  go to `<out>_error.jsonl` (and are not retried on resume).

  Args:
    target: a `Target` with a tokenizer that has a chat template.
    rows: `[{"id", "turns": [user strings]}]` (from `read_rows` / `stdlib_code_prompts`).
    out_path: output JSONL; rows are `{"id", "conversations": [{"role", "content"}...],
      "finish_reasons": ["stop"|"length", ...]}` (a system message first if `system_prompt`).
    max_new_tokens: answer length limit per turn.
    temperature, top_p, top_k: sampling parameters.
    batch_size: rows per device batch of `generate`.
    seed: sampling seed.
    system_prompt: optional system message given to the target (and stored in the output).
    progress: tqdm bar over rows with generated tokens/s.
    chunk_size: rows per chunk (flush unit; default 4 * batch_size).
    chat_template_kwargs: extra variables for the chat template.
    max_context_tokens: stop a conversation before a turn whose prompt is this long
      (e.g. the training `max_length`, beyond which answers would be truncated away).

  Returns:
    `out_path`.
  """
  from dspark_jax.generation import generate  # lazy: pulls in jax

  out_path = os.fspath(out_path)
  tok = target.tokenizer
  if tok is None or not tok.has_chat_template:
    raise ValueError("regenerate needs a target whose tokenizer has a chat template")
  kwargs = dict(chat_template_kwargs or {})
  seen: set[str] = set()
  for r in rows:
    if str(r["id"]) in seen:
      raise ValueError(f"duplicate row id {r['id']!r}: ids key the resume bookkeeping")
    seen.add(str(r["id"]))
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  err_path = _error_path(out_path)
  done = _scan_jsonl_ids(out_path, repair=True) | _scan_jsonl_ids(err_path, repair=True)
  order = sorted((i for i, r in enumerate(rows) if str(r["id"]) not in done),
                 key=lambda i: (len(rows[i]["turns"][0]) if rows[i]["turns"] else 0, i))
  pending = [rows[i] for i in order]
  if not pending:
    return out_path

  stops = list(target.stop_token_ids) or list(tok.eos_token_ids)
  stop_texts = [tok.decode([s], skip_special_tokens=False) for s in stops]
  stop_texts += [t for t in (getattr(tok.hf, "eos_token", None),) if t]
  limit = target.config.max_position_embeddings
  chunk = chunk_size or 4 * batch_size
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(pending), desc="regenerate", unit="row", dynamic_ncols=True)
  n_tokens, t0 = 0, time.perf_counter()
  try:
    with open(out_path, "a", encoding="utf-8") as out, \
         open(err_path, "a", encoding="utf-8") as err:
      for c0 in range(0, len(pending), chunk):
        part = pending[c0:c0 + chunk]
        convs = [[{"role": "system", "content": system_prompt}] if system_prompt else []
                 for _ in part]
        reasons: list[list[str]] = [[] for _ in part]
        alive = [True] * len(part)
        for turn in range(max(len(r["turns"]) for r in part)):
          idx, prompts, budgets = [], [], []
          for j, r in enumerate(part):
            if not alive[j] or turn >= len(r["turns"]):
              continue
            msgs = convs[j] + [{"role": "user", "content": r["turns"][turn]}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, **kwargs)
            room = limit - len(ids)
            if room < 1 or (max_context_tokens and len(ids) >= max_context_tokens):
              alive[j] = False
              continue
            idx.append(j)
            prompts.append(ids)
            budgets.append(min(max_new_tokens, room))
          if not idx:
            break
          res = generate(target, prompts, max_new_tokens=budgets, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stops,
                         batch_size=batch_size,
                         request_ids=[_request_id(part[j]["id"], turn) for j in idx])
          for j, toks, reason in zip(idx, res.tokens, res.stats.finish_reasons):
            n_tokens += len(toks)
            while toks and toks[-1] in stops:
              toks = toks[:-1]
            text = _strip_stop_text(tok.decode(toks, skip_special_tokens=True), stop_texts)
            convs[j] += [{"role": "user", "content": part[j]["turns"][turn]},
                         {"role": "assistant", "content": text}]
            reasons[j].append(reason)
        for j, r in enumerate(part):
          if reasons[j]:
            out.write(json.dumps({"id": r["id"], "conversations": convs[j],
                                  "finish_reasons": reasons[j]}, ensure_ascii=False) + "\n")
          else:
            err.write(json.dumps({"id": r["id"], "turns": r["turns"],
                                  "error": "prompt does not fit the context"},
                                 ensure_ascii=False) + "\n")
        out.flush()
        err.flush()
        if bar is not None:
          bar.update(len(part))
          bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
  finally:
    if bar is not None:
      bar.close()
  if os.path.exists(err_path) and os.path.getsize(err_path) == 0:
    os.remove(err_path)
  return out_path


# =============================================================================================
# 3. Tokenisation with an assistant-only loss mask
# =============================================================================================
def _hf(tokenizer):
  """The HF fast tokenizer behind a `dspark_jax.tokenizer.Tokenizer` (or itself)."""
  hf = getattr(tokenizer, "hf", tokenizer)
  if not getattr(hf, "is_fast", False):
    raise TypeError("tokenize_conversation needs a fast (Rust) HF tokenizer for offset mappings")
  if not getattr(hf, "chat_template", None):
    raise ValueError("this tokenizer has no chat template")
  return hf


def _render(hf, messages, gen: bool, kwargs) -> str:
  return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)


_PROBE_USER, _PROBE_ANSWER = "Dspark probe question 7319?", "Dspark probe answer 4682."
_EOT_CACHE: dict[tuple, str | None] = {}


def _probe_end_of_turn(hf, kwargs) -> str | None:
  """The text a template writes right after an assistant message (`<|im_end|>\\n` for ChatML).

  Found once per template by rendering a probe conversation; None if the template does not
  render the probe answer verbatim.
  """
  key = (id(hf), hf.chat_template, json.dumps(kwargs, sort_keys=True, default=str))
  if key not in _EOT_CACHE:
    text = _render(hf, [{"role": "user", "content": _PROBE_USER},
                        {"role": "assistant", "content": _PROBE_ANSWER}], False, kwargs)
    at = text.rfind(_PROBE_ANSWER)
    _EOT_CACHE[key] = text[at + len(_PROBE_ANSWER):] if at >= 0 else None
  return _EOT_CACHE[key]


def _locate(text: str, content: str, start: int) -> tuple[int, int] | None:
  """Char span of `content` in `text` at or after `start`, tolerating templates that strip it."""
  for variant in (content, content.strip(), content.lstrip("\n"), content.rstrip()):
    if not variant and content.strip():
      continue
    at = text.find(variant, start)
    if at >= 0:
      return at, at + len(variant)
  return None


def render_with_spans(tokenizer, messages: Sequence[dict], *, system_prompt: str | None = None,
                      assistant_prefix: str = "", chat_template_kwargs: dict | None = None
                      ) -> tuple[str, list[tuple[int, int]]]:
  """Renders a chat and finds the loss character spans (assistant bodies + end-of-turn).

  A span starts where the template's generation prompt for that turn ends (so Qwen3's
  `<think>\\n\\n</think>\\n\\n` block on the last turn is inside, as in DeepSpec) when the
  generation-prompt rendering of the history is a prefix of the full text; otherwise at the
  located content. `assistant_prefix` (Gemma 4's empty thought channel) is prepended to every
  assistant content before rendering and kept out of the span. A span ends after the
  end-of-turn text: the probed end-of-turn marker if it follows the content, else the text up to
  where the next message's rendering starts, or the end of the text for the last message. If
  the template rewrites a content (e.g. Qwen3 reformats a `<think>` block) but the header was
  found, the span follows DeepSpec's rule: header end to the next end-of-turn marker.

  Args:
    tokenizer: `dspark_jax.tokenizer.Tokenizer` or an HF fast tokenizer with a chat template.
    messages: `[{"role", "content"}]` (roles normalised as in `normalize_messages`).
    system_prompt: prepended as a system message unless the chat starts with one.
    assistant_prefix: string prepended to each assistant content, excluded from the loss.
    chat_template_kwargs: extra template variables.

  Returns:
    (rendered text, sorted non-overlapping `[(start, end)]` char spans).

  Raises:
    TemplateMismatchError: an assistant content is not rendered verbatim.
  """
  hf = _hf(tokenizer)
  kwargs = dict(chat_template_kwargs or {})
  msgs = normalize_messages(list(messages))
  if system_prompt and not (msgs and msgs[0]["role"] == "system"):
    msgs.insert(0, {"role": "system", "content": system_prompt})
  if assistant_prefix:
    msgs = [dict(m, content=assistant_prefix + m["content"]) if m["role"] == "assistant" else m
            for m in msgs]
  text = _render(hf, msgs, False, kwargs)
  eot = _probe_end_of_turn(hf, kwargs)
  spans: list[tuple[int, int]] = []
  cursor = 0
  last_assistant = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
  for i, m in enumerate(msgs):
    if m["role"] != "assistant":
      continue
    header_end = None
    if i > 0:
      head = _render(hf, msgs[:i], True, kwargs)
      if text.startswith(head) and len(head) >= cursor:
        header_end = len(head)
    found = _locate(text, m["content"], cursor if header_end is None else header_end)
    if found is None and assistant_prefix:  # the template dropped the prefix (history turns)
      found = _locate(text, m["content"][len(assistant_prefix):], cursor)
    if found is None and header_end is not None and eot:
      # The template rewrote the content (e.g. Qwen3 moves a <think> block): fall back to
      # DeepSpec's own rule, the span from the assistant header to the next end-of-turn.
      at = text.find(eot, header_end)
      if at >= 0:
        spans.append((header_end, at + len(eot)))
        cursor = at + len(eot)
        continue
    if found is None:
      raise TemplateMismatchError(
          f"assistant message {i} is not rendered verbatim by the chat template (it changes the "
          f"content, e.g. strips a <think> block), so its loss span cannot be located: "
          f"{m['content'][:80]!r}")
    c_start, c_end = found
    start = c_start if header_end is None else min(header_end, c_start)
    if assistant_prefix and text.startswith(assistant_prefix, start):
      start += len(assistant_prefix)
    if eot and text.startswith(eot, c_end):
      end = c_end + len(eot)
    elif i == len(msgs) - 1:
      end = len(text)
    else:
      nxt = _render(hf, msgs[:i + 1], False, kwargs)
      if text.startswith(nxt) and len(nxt) >= c_end:
        end = len(nxt)
      elif i == last_assistant and eot is None:
        end = c_end
      else:
        raise TemplateMismatchError(
            f"cannot find the end-of-turn marker after assistant message {i} (expected "
            f"{eot!r} after the content)")
    spans.append((start, end))
    cursor = end
  return text, spans


def _mask_from_offsets(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """uint8 mask of tokens whose first character lies inside one of `spans`.

  A token's first character is its start offset; tokenizers that trim whitespace from offsets
  can give an empty `(e, e)` span (e.g. a lone "\\n"), which is attributed to where the previous
  token ended instead, so such tokens still count as part of the text they cover.
  """
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
  if offsets.shape[0] == 0:
    return np.zeros((0,), np.uint8)
  s, e = offsets[:, 0], offsets[:, 1]
  prev_end = np.concatenate([[0], np.maximum.accumulate(e)[:-1]])
  first = np.where(e > s, s, np.minimum(s, prev_end))
  mask = np.zeros(offsets.shape[0], bool)
  for a, b in spans:
    mask |= (first >= a) & (first < b)
  return mask.astype(np.uint8)


def tokenize_conversation(tokenizer, messages: Sequence[dict], *, max_length: int = 4096,
                          system_prompt: str | None = None, assistant_prefix: str = "",
                          chat_template_kwargs: dict | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Chat-template tokens of one conversation and its assistant-only loss mask.

  The text is rendered with the tokenizer's own template (`add_generation_prompt=False`),
  tokenised once with `add_special_tokens=False` and offset mappings, and right-truncated at
  `max_length`. `loss_mask[t] = 1` for tokens of an assistant body including the end-of-turn
  marker that follows it (`<|im_end|>\\n` for ChatML/Qwen, `<turn|>\\n` for Gemma 4); see
  `render_with_spans` for how the spans are found.

  Args:
    tokenizer: `Tokenizer` or HF fast tokenizer with a chat template.
    messages: `[{"role", "content"}]`.
    max_length: truncation length S_max.
    system_prompt: default system message (DeepSpec's Qwen recipe uses "You are a helpful
      assistant."), used only if the chat has none.
    assistant_prefix: prepended to assistant contents and excluded from the loss (Gemma 4:
      `<|channel>thought\\n<channel|>`).
    chat_template_kwargs: extra template variables.

  Returns:
    (input_ids int32 `[S]`, loss_mask uint8 `[S]`), S <= max_length.
  """
  hf = _hf(tokenizer)
  text, spans = render_with_spans(hf, messages, system_prompt=system_prompt,
                                  assistant_prefix=assistant_prefix,
                                  chat_template_kwargs=chat_template_kwargs)
  enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)[:max_length]
  mask = _mask_from_offsets(enc["offset_mapping"], spans)[:max_length]
  return ids, mask


def _read_conversations(path: str) -> Iterable[tuple[str, Any, list[dict]]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict) or not ("conversations" in row or "messages" in row):
        raise DataFormatError(f"{where}: expected a regenerated row with 'conversations'")
      msgs = normalize_messages(row.get("conversations", row.get("messages")), where)
      yield where, row.get("id", lineno - 1), msgs


def _write_npy_member(zf: zipfile.ZipFile, name: str, dtype, count: int, src) -> None:
  """Streams a 1-D array (raw bytes from file `src`, or an ndarray) into an .npz member."""
  with zf.open(name + ".npy", "w", force_zip64=True) as f:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (count,)}
    np.lib.format.write_array_header_2_0(f, header)
    if isinstance(src, np.ndarray):
      f.write(np.ascontiguousarray(src, dtype).tobytes())
    else:
      while block := src.read(1 << 24):
        f.write(block)


def tokenize_file(tokenizer, jsonl_path: str | os.PathLike, out_path: str | os.PathLike, *,
                  max_length: int = 4096, min_loss_tokens: int = 14,
                  system_prompt: str | None = None, assistant_prefix: str = "",
                  chat_template_kwargs: dict | None = None, batch_size: int = 256,
                  on_error: str = "skip", progress: bool = True) -> dict:
  """Tokenises a regenerated JSONL into one uncompressed `.npz` (written atomically).

  Layout: `tokens int32[T]` and `loss_mask uint8[T]` (all kept samples concatenated),
  `offsets int64[N+1]` (sample i is `[offsets[i], offsets[i+1])`), `ids` (str[N], row ids),
  `meta` (a JSON string: max_length, min_loss_tokens, system_prompt, assistant_prefix, source).
  Samples with fewer than `min_loss_tokens` loss tokens after truncation are dropped, as
  DeepSpec drops them when it builds its cache. Token arrays are streamed through temporary
  files, so memory stays flat for large corpora; the members are stored uncompressed so
  `load_tokenized` can memory-map them.

  Args:
    tokenizer: `Tokenizer` or HF fast tokenizer.
    jsonl_path: rows with "conversations" (the output of `regenerate`).
    out_path: the `.npz` to write.
    max_length, system_prompt, assistant_prefix, chat_template_kwargs: see
      `tokenize_conversation`.
    min_loss_tokens: drop threshold.
    batch_size: texts per batched (multi-threaded) tokenizer call.
    on_error: "skip" (count and warn) or "raise" for rows whose template rendering cannot be
      matched (`TemplateMismatchError`).
    progress: tqdm bar over rows.

  Returns:
    counts: {"samples", "dropped_short", "errors", "tokens", "loss_tokens", "truncated"}.
  """
  if on_error not in ("skip", "raise"):
    raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
  hf = _hf(tokenizer)
  jsonl_path, out_path = os.fspath(jsonl_path), os.fspath(out_path)
  counts = dict(samples=0, dropped_short=0, errors=0, tokens=0, loss_tokens=0, truncated=0)
  first_error = None
  tmp_tok, tmp_mask, tmp_npz = out_path + ".tokens.tmp", out_path + ".mask.tmp", out_path + ".tmp"
  lengths: list[int] = []
  ids_out: list[str] = []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(desc="tokenize", unit="row", dynamic_ncols=True)
  try:
    with open(tmp_tok, "wb") as ftok, open(tmp_mask, "wb") as fmask:

      def flush(batch):
        if not batch:
          return
        enc = hf([t for _, t, _ in batch], add_special_tokens=False,
                 return_offsets_mapping=True)
        for (rid, _, spans), toks, offs in zip(batch, enc["input_ids"], enc["offset_mapping"]):
          toks = np.asarray(toks, np.int32)
          mask = _mask_from_offsets(offs, spans)
          if toks.shape[0] > max_length:
            counts["truncated"] += 1
            toks, mask = toks[:max_length], mask[:max_length]
          n_loss = int(mask.sum())
          if n_loss < min_loss_tokens:
            counts["dropped_short"] += 1
            continue
          ftok.write(toks.tobytes())
          fmask.write(mask.tobytes())
          lengths.append(int(toks.shape[0]))
          ids_out.append(str(rid))
          counts["samples"] += 1
          counts["tokens"] += int(toks.shape[0])
          counts["loss_tokens"] += n_loss
        if bar is not None:
          bar.update(len(batch))
        batch.clear()

      batch: list = []
      for where, rid, msgs in _read_conversations(jsonl_path):
        try:
          text, spans = render_with_spans(hf, msgs, system_prompt=system_prompt,
                                          assistant_prefix=assistant_prefix,
                                          chat_template_kwargs=chat_template_kwargs)
        except TemplateMismatchError as e:
          if on_error == "raise":
            raise TemplateMismatchError(f"{where}: {e}") from None
          counts["errors"] += 1
          first_error = first_error or f"{where}: {e}"
          continue
        batch.append((rid, text, spans))
        if len(batch) >= batch_size:
          flush(batch)
      flush(batch)
    if counts["errors"]:
      warnings.warn(f"tokenize_file skipped {counts['errors']} rows whose chat-template rendering "
                    f"could not be matched; first: {first_error}")
    meta = dict(max_length=max_length, min_loss_tokens=min_loss_tokens,
                system_prompt=system_prompt, assistant_prefix=assistant_prefix,
                chat_template_kwargs=chat_template_kwargs, source=os.path.abspath(jsonl_path),
                counts=counts)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    with zipfile.ZipFile(tmp_npz, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      with open(tmp_tok, "rb") as f:
        _write_npy_member(zf, "tokens", np.int32, total, f)
      with open(tmp_mask, "rb") as f:
        _write_npy_member(zf, "loss_mask", np.uint8, total, f)
      _write_npy_member(zf, "offsets", np.int64, len(offsets), offsets)
      ids_arr = np.asarray(ids_out, dtype=str) if ids_out else np.zeros((0,), "<U1")
      _write_npy_member(zf, "ids", ids_arr.dtype, len(ids_arr), ids_arr)
      with zf.open("meta.npy", "w") as f:
        np.lib.format.write_array(f, np.asarray(json.dumps(meta)))
    os.replace(tmp_npz, out_path)
  finally:
    if bar is not None:
      bar.close()
    for p in (tmp_tok, tmp_mask, tmp_npz):
      if os.path.exists(p):
        os.remove(p)
  return counts


@dataclasses.dataclass
class TokenizedData:
  """A tokenised corpus (the arrays of `tokenize_file`'s `.npz`).

  Attributes:
    tokens: int32 `[T]` (memory-mapped when possible).
    loss_mask: uint8 `[T]`.
    offsets: int64 `[N+1]`.
    ids: str `[N]`.
    meta: dict.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  offsets: np.ndarray
  ids: np.ndarray
  meta: dict

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    return self.tokens[a:b], self.loss_mask[a:b]


def _npz_member_memmap(path: str, zf: zipfile.ZipFile, name: str) -> np.ndarray | None:
  """Memory-maps an uncompressed .npy member of a zip (None if compressed)."""
  info = zf.getinfo(name + ".npy")
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30],
                                                                                 "little")
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
      return None
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    data_start = f.tell()
  if fortran or dtype.hasobject:
    return None
  if int(np.prod(shape)) == 0:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=shape)


def load_tokenized(path: str | os.PathLike, mmap: bool = True) -> TokenizedData:
  """Loads `tokenize_file`'s output; token arrays are memory-mapped unless `mmap=False`."""
  path = os.fspath(path)
  with np.load(path, allow_pickle=False) as z:
    offsets = np.asarray(z["offsets"], np.int64)
    ids = np.asarray(z["ids"])
    meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    tokens = loss_mask = None
    if mmap:
      with zipfile.ZipFile(path) as zf:
        tokens = _npz_member_memmap(path, zf, "tokens")
        loss_mask = _npz_member_memmap(path, zf, "loss_mask")
    if tokens is None or loss_mask is None:
      tokens, loss_mask = np.asarray(z["tokens"]), np.asarray(z["loss_mask"])
  if tokens.shape != loss_mask.shape or int(offsets[-1]) != tokens.shape[0]:
    raise DataFormatError(f"{path}: inconsistent arrays (tokens {tokens.shape}, loss_mask "
                          f"{loss_mask.shape}, offsets end {int(offsets[-1])})")
  return TokenizedData(tokens=tokens, loss_mask=loss_mask, offsets=offsets, ids=ids, meta=meta)


# =============================================================================================
# 4. Fixed-shape batches with exact resume
# =============================================================================================
class BatchIterator:
  """Endless iterator of shuffled fixed-shape batches over a tokenised corpus.

  Epoch e visits `samples_per_epoch = floor(N / B) * B` samples: a permutation drawn from
  `np.random.default_rng([seed, e])`, the last `N mod B` dropped (as DeepSpec's sampler does).
  With `bucket_window = k > 1`, each run of k*B permuted samples is sorted by length before being
  cut into batches, and those k batches are shuffled (same rng), so batches hold similar
  lengths (less padding) while the order stays a pure function of (seed, epoch).

  Each batch is a dict of numpy arrays:
    tokens int32 `[B, S]` (right-padded with `pad_id`, truncated at S = `seq_len`),
    loss_mask uint8 `[B, S]` (0 on padding),
    lengths int32 `[B]` (true lengths, <= S),
    sample_index int64 `[B]` (rows of the corpus, e.g. for an offline feature cache).

  The position is `state() == {"epoch", "index"}` (+ identity checks); `restore(state)` makes
  the iterator continue exactly where the saved one was.
  """

  def __init__(self, data: TokenizedData | str | os.PathLike, *, batch_size: int, seq_len: int,
               seed: int = 42, pad_id: int = 0, shuffle: bool = True, bucket_window: int = 0):
    """Args:
      data: `TokenizedData` or a path to `tokenize_file`'s `.npz`.
      batch_size: B, samples per batch (the global batch).
      seq_len: S, fixed sequence length.
      seed: shuffle seed.
      pad_id: token id of padding.
      shuffle: False visits samples in file order (tests, evaluation).
      bucket_window: sort-within-window bucketing, in batches (0/1 = off).
    """
    self.data = data if isinstance(data, TokenizedData) else load_tokenized(data)
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    self.num_samples = len(self.data)
    if self.num_samples < batch_size:
      raise ValueError(f"the corpus has {self.num_samples} samples, fewer than one batch of "
                       f"{batch_size}")
    self.batch_size, self.seq_len = int(batch_size), int(seq_len)
    self.seed, self.pad_id, self.shuffle = int(seed), int(pad_id), bool(shuffle)
    self.bucket_window = int(bucket_window)
    self.steps_per_epoch = self.num_samples // self.batch_size
    self.samples_per_epoch = self.steps_per_epoch * self.batch_size
    self._lengths = np.minimum(self.data.lengths, self.seq_len)
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order = None, None

  def epoch_order(self, epoch: int) -> np.ndarray:
    """int64 `[steps_per_epoch, B]`: the sample indices of every batch of `epoch`."""
    b = self.batch_size
    if not self.shuffle:
      return np.arange(self.samples_per_epoch, dtype=np.int64).reshape(-1, b)
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(self.num_samples)[:self.samples_per_epoch].reshape(-1, b)
    k = self.bucket_window
    if k > 1:
      for w in range(0, perm.shape[0], k):
        win = perm[w:w + k].reshape(-1)
        win = win[np.argsort(-self._lengths[win], kind="stable")].reshape(-1, b)
        perm[w:w + k] = win[rng.permutation(win.shape[0])]
    return perm.astype(np.int64)

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
            "batch_size": self.batch_size, "num_samples": self.num_samples}

  def restore(self, state: dict) -> None:
    """Continues from `state()` of an iterator over the same corpus and settings."""
    for k in ("seed", "batch_size", "num_samples"):
      if k in state and int(state[k]) != getattr(self, k):
        raise ValueError(f"cannot restore a data position saved with {k}={state[k]} into an "
                         f"iterator with {k}={getattr(self, k)}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.index >= self.steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    if self._order_epoch != self.epoch:
      self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
    rows = self._order[self.index]
    self.index += 1
    return self.make_batch(rows)

  def make_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    b, s = len(rows), self.seq_len
    tokens = np.full((b, s), self.pad_id, np.int32)
    mask = np.zeros((b, s), np.uint8)
    lengths = np.zeros((b,), np.int32)
    for j, i in enumerate(rows):
      toks, m = self.data.sample(int(i))
      n = min(len(toks), s)
      tokens[j, :n] = toks[:n]
      mask[j, :n] = m[:n]
      lengths[j] = n
    return {"tokens": tokens, "loss_mask": mask, "lengths": lengths,
            "sample_index": np.asarray(rows, np.int64)}
