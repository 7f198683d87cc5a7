"""Reading prompt files: DeepSpec eval/train JSONL, ShareGPT/OpenAI conversations, GSM8K, prompts.

`read_rows` turns any of these into `[{"id", "turns": [user strings]}]`, the input of
`regenerate`; `normalize_messages` maps roles as DeepSpec does (also used when tokenising).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Iterator

# DeepSpec's role mapping (scripts/data/download_and_split.py); other roles are dropped.
_USER_ROLES = {"user": "user", "human": "user"}
_ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
                    "bing": "assistant", "bard": "assistant", "model": "assistant"}


class DataFormatError(ValueError):
  """A data file row that cannot be understood (the message names file:line)."""


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


def jsonl_objects(path: str) -> Iterator[tuple[int, str, Any]]:
  """(line number, "file:line", parsed JSON) of every non-blank line, read lazily.

  Raises:
    DataFormatError: a line that is not valid JSON (with file:line).
  """
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        yield lineno, where, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


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
  for lineno, where, row in jsonl_objects(path):
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
    if limit and len(rows) >= limit:
      break  # before the next line is even parsed
  if skipped:
    warnings.warn(f"{path}: skipped {skipped} rows without a user turn")
  return rows


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def reference_conversations(path: str | os.PathLike, *, exclude_ids=(), limit: int = 0
                            ) -> list[dict]:
  """Rows of a prompts file that ship their own answer, as one-turn conversations.

  GSM8K rows (`{"question", "answer"}`) carry a reference solution; its calculator
  annotations (`<<48/2=24>>`) are removed, since no model writes them. Ids follow
  `read_rows` (the row's own "id", else its 0-based row number), so they line up with a
  regenerated file of the same prompts; rows whose id is in `exclude_ids` (already
  regenerated) and rows without an answer are skipped.

  Returns:
    `[{"id", "conversations": [user, assistant], "source": "reference"}]`.
  """
  skip = {str(i) for i in exclude_ids}
  out = []
  for index, (_, where, row) in enumerate(jsonl_objects(os.fspath(path))):
    if not isinstance(row, dict):
      raise DataFormatError(f"{where}: expected a JSON object")
    rid = row.get("id", index)
    q, a = row.get("question"), row.get("answer")
    if str(rid) in skip or not isinstance(q, str) or not isinstance(a, str):
      continue
    answer = _CALCULATOR.sub("", a).strip()
    out.append({"id": rid, "conversations": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": answer}],
                "source": "reference"})
    if limit and len(out) >= limit:
      break
  return out
