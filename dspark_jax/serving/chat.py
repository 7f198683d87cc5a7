"""Interactive chat: `python serve.py --config.mode=chat`.

Multi-turn with the tokenizer's chat template; each reply is printed as its tokens are
committed (through the continuous batcher, one slot). `/reset` starts a new conversation,
`/exit` (or end of input) quits.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from dspark_jax.engine.batcher import ContinuousBatcher, Request, RequestError

HELP = "commands: /reset (new conversation), /exit (quit)"


def chat_loop(target, batcher: ContinuousBatcher, *, max_new_tokens: int,
              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict]:
  """Runs the conversation until /exit or EOF; returns the messages of the last one."""
  tok = target.tokenizer
  if tok is None or not tok.has_chat_template:
    raise ValueError("chat mode needs a tokenizer with a chat template")
  print(HELP, file=out, flush=True)
  messages: list[dict] = []
  while True:
    try:
      line = read("> ")
    except EOFError:
      print(file=out)
      return messages
    text = line.strip()
    if not text:
      continue
    if text == "/exit":
      return messages
    if text == "/reset":
      messages = []
      print("(new conversation)", file=out, flush=True)
      continue
    if text.startswith("/"):
      print(f"unknown command {text!r}; {HELP}", file=out, flush=True)
      continue
    messages.append({"role": "user", "content": text})
    shown = [0]

    def show(r: Request) -> None:
      t = r.stable_text()
      print(t[shown[0]:], end="", file=out, flush=True)
      shown[0] = len(t)

    req = Request(prompt=tok.apply_chat_template(messages), max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, on_update=show)
    try:
      batcher.run([req])
    except RequestError as e:
      messages.pop()
      print(f"error: {e}", file=out, flush=True)
      continue
    print(file=out, flush=True)
    messages.append({"role": "assistant", "content": req.text})
