"""Tokenizer + chat template, via transformers' fast tokenizers (no torch needed)."""

from __future__ import annotations

import json
import os
from typing import Sequence


class Tokenizer:
  """Thin wrapper so the rest of the library needs four methods, not the HF API."""

  def __init__(self, hf_tokenizer):
    self.hf = hf_tokenizer

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "Tokenizer | None":
    """Loads the tokenizer saved in an HF model dir; None if the dir has none."""
    path = os.fspath(path)
    if not any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
      return None
    from transformers import AutoTokenizer  # imported lazily: heavy
    return cls(AutoTokenizer.from_pretrained(path))

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    ids = []
    if self.hf.eos_token_id is not None:
      ids.append(int(self.hf.eos_token_id))
    return tuple(ids)

  @property
  def pad_token_id(self) -> int | None:
    return self.hf.pad_token_id

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.hf, "chat_template", None))

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                          **kwargs) -> list[int]:
    """Renders chat messages and tokenizes them (no extra special tokens, as DeepSpec does)."""
    if not self.has_chat_template:
      raise ValueError("this tokenizer has no chat template; pass raw prompts instead")
    text = self.hf.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kwargs)
    return self.encode(text, add_special_tokens=False)

  def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                  **kwargs) -> str:
    return self.hf.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kwargs)


def generation_eos_ids(path: str | os.PathLike) -> tuple[int, ...]:
  """eos ids from `generation_config.json` (Qwen3 lists `<|im_end|>` and `<|endoftext|>`)."""
  f = os.path.join(os.fspath(path), "generation_config.json")
  if not os.path.exists(f):
    return ()
  with open(f) as fh:
    eos = json.load(fh).get("eos_token_id")
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, list) else (int(eos),)
