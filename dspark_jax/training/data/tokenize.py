"""Tokenisation: chat-template rendering with assistant loss spans, `tokenize_file`, loading.

`render_with_spans` renders a chat with the tokenizer's own template and finds the character
spans of the assistant bodies (+ end-of-turn marker); `tokenize_conversation` / `tokenize_file`
turn them into tokens and an assistant-only loss mask; `load_tokenized` memory-maps the `.npz`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zipfile
from typing import Any, Iterable, Sequence

import numpy as np

from dspark_jax.training.data.rows import DataFormatError, jsonl_objects, normalize_messages


class TemplateMismatchError(ValueError):
  """The chat template rendered an assistant message so that it cannot be located."""


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
  for lineno, where, row in jsonl_objects(path):
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
