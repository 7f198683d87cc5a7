"""Helpers of the tests that run on a fake multi-device CPU mesh.

XLA fixes the host platform's device count when jax initialises, and the test process has
already initialised it with one device, so mesh checks run a script in a fresh Python with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`. The script prints one JSON line
after `RESULT`, which `run_on_fake_devices` returns.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Imported by the scripts: builds a small random qwen3 checkpoint directory (so
# `load_target(dir, mesh=...)` runs its real sharded loading path) with head counts that
# split on a 4-way tensor axis but whose kv heads do not split 8 ways (the rules' replicated
# fallback), and saves DSpark / Eagle3 drafts of it.
PRELUDE = """
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
import dspark_jax as dj
from dspark_jax import sharding
from dspark_jax.checkpoints import hf as hf_ckpt
from dspark_jax.checkpoints.safetensors_io import save_tensors
from dspark_jax.demo import tiny

from flax import nnx
from dspark_jax.drafts import api as draft_api
from dspark_jax.models import transformer

def filled(abstract, seed, std):
  # Random values drawn in numpy: eager jax init runs one small program per parameter,
  # which costs seconds on 8 fake devices. Matrices N(0, std), norm scales 1, biases 0.
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(abstract)
  flat = []
  for path, var in nnx.to_flat_state(state):
    x = var.get_value()
    if len(x.shape) >= 2:
      value = rng.normal(0.0, std, x.shape)
    else:
      value = np.full(x.shape, 1.0 if path[-1] == "scale" else 0.0)
    flat.append((path, var.replace(jnp.asarray(value, x.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))

def write_checkpoint(path, seed=2, scale=12.0):
  cfg = tiny.tiny_config("qwen3", vocab=96, hidden=64, layers=4, heads=8, kv_heads=4,
                         head_dim=8)
  model = filled(transformer.abstract_model(cfg), seed, 0.02 * scale)
  os.makedirs(path, exist_ok=True)
  save_tensors(hf_ckpt.export_state(model), path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(tiny.hf_config_dict(cfg), f)
  return dj.load_target(path)

def write_drafts(target, out):
  dirs = {}
  for algo in ("dspark", "eagle3"):
    dcfg = draft_api.make_config(target.config, algo, num_layers=1 if algo == "eagle3" else 2,
                                 block_size=4, target_layer_ids=(0, 2), markov_rank=8)
    module = filled(nnx.eval_shape(lambda: draft_api.build_module(dcfg)), 1, 0.02)
    dirs[algo] = dj.save_draft(draft_api.Draft(dcfg, module), os.path.join(out, algo),
                               target=target, dtype="float32", include_frozen=False)
  return dirs

def per_device_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)

def result(obj):
  print("RESULT" + json.dumps(obj))
"""


def run_on_fake_devices(script: str, *args, devices: int = 8, timeout: int = 600):
  """Runs `PRELUDE + script` with `devices` fake CPU devices; returns its RESULT object."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  res = subprocess.run([sys.executable, "-c", PRELUDE + script, *map(str, args)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=timeout)
  assert res.returncode == 0, res.stderr[-4000:]
  return json.loads(res.stdout.split("RESULT")[-1])
