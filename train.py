"""Train DSpark / DFlash / Eagle3 drafts with target features computed online.

  python train.py --config=configs/gemma4_12b.py --workdir=runs/gemma4
  python train.py --config=configs/tiny.py --workdir=/tmp/tiny            # ~1 min on CPU
  python train.py --config=configs/qwen3_4b.py --config.algorithm=eagle3 --config.draft.num_layers=1 \
      --config.data.prompts=prompts.jsonl --workdir=runs/q4 --mode=generate_data
  python train.py --config=configs/qwen3_8b.py --workdir=runs/q8 --distributed  # same on every host

Multi-host: prepare data once (`--mode=generate_data`, then `--mode=tokenize`) into a workdir
every host sees, then run the same `--distributed` command on every host; host 0 writes the
metrics and the exported draft.

With no --mode the whole pipeline runs (regenerate -> tokenize -> train -> export), skipping
stages whose outputs already exist in --workdir and resuming training from its checkpoints.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for data, checkpoints, metrics, draft")
_MODE = flags.DEFINE_enum("mode", "all", ["all", "generate_data", "tokenize", "cache_features",
                                          "train", "export"], "pipeline stage to run")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-host: call jax.distributed.initialize() first (the cluster "
    "is auto-detected: Cloud TPU, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS / "
    "JAX_NUM_PROCESSES / JAX_PROCESS_ID); every host runs the same command")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax and absl log every checkpoint step at INFO; the progress bar says what matters.
  logging.set_verbosity(logging.WARNING)
  for name in ("absl", "orbax", "jax._src.xla_bridge"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  if _DISTRIBUTED.value:
    import os
    import jax
    env = os.environ
    kw = {}
    if "JAX_NUM_PROCESSES" in env:  # explicit cluster; otherwise JAX auto-detects it
      kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)  # before any other JAX call: the mesh spans all hosts
  from dspark_jax.training import driver  # after flag parsing: keeps --help fast
  driver.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  import sys
  from dspark_jax.run_config import precheck_argv
  precheck_argv(sys.argv)  # a mistyped --config.<field> gets a message naming valid fields
  app.run(main)
