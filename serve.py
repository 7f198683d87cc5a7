r"""Serving, plain or speculative: batch jobs, an OpenAI-compatible server, a chat CLI.

  python serve.py                                   # embedded demo model + demo draft, offline
  python serve.py --config.draft=                   # plain autoregressive decoding
  python serve.py --config.prompts=../shared/data/eval/gsm8k.jsonl --config.max_prompts=32 \
      --config.output=/tmp/out.jsonl                # resumable: a rerun skips finished rows
  python serve.py --config.mode=server --config.host=127.0.0.1 --config.port=8000
  python serve.py --config.mode=chat
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "serve.py")
if __name__ == "__main__":
  # Before DEFINE: with a default file, ml_collections parses overrides at definition time.
  from dspark_jax.run_config import precheck_argv
  precheck_argv(sys.argv, _DEFAULT_CONFIG)  # a mistyped --config.<field> names valid fields
from dspark_jax.run_config import describe_fields  # noqa: E402  (light: no JAX import)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG,
    "serve config file (ml_collections); override its fields as --config.<field>=...; "
    "fields, defaults and meaning:\n" + describe_fields(_DEFAULT_CONFIG),
    lock_config=True)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "show the full traceback of an error")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dspark_jax.serving import app as serving  # after flag parsing: keeps --help fast
  try:
    serving.serve(_CONFIG.value)
  except (ValueError, OSError, RuntimeError) as e:
    if _TRACEBACK.value:
      raise
    sys.exit(f"error: {e}  (--traceback shows where)")
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
