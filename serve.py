"""Batch generation, plain or speculative.

  python serve.py                                   # embedded demo model + demo draft, offline
  python serve.py --config.draft=                   # plain autoregressive decoding
  python serve.py --config.prompts=../shared/data/eval/gsm8k.jsonl --config.max_prompts=32 \
      --config.output=/tmp/out.jsonl
"""

import os
import sys

from absl import app
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "serve.py")
if __name__ == "__main__":
  # Before DEFINE: with a default file, ml_collections parses overrides at definition time.
  from dspark_jax.run_config import precheck_argv
  precheck_argv(sys.argv, _DEFAULT_CONFIG)  # a mistyped --config.<field> names valid fields
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG,
    "serve config file (ml_collections); fields are overridable as --config.<field>=...",
    lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dspark_jax.serving import engine  # after flag parsing: keeps --help fast
  engine.serve(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
