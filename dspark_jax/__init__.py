"""dspark-jax: DSpark speculative decoding in JAX / Flax NNX.

Public API (stable names):

  load_target(path_or_id, *, dtype="float32", mesh=None) -> Target
  generate(target, prompts, *, draft=None, max_new_tokens, temperature=0.0, top_k=0,
           top_p=1.0, seed=0, stop_tokens=None, tree=None, ...) -> GenerationResult
  TreeShape(branching)   a static token tree for `generate(..., tree=...)` (e.g. "2,2,1")
  load_draft(path, target) / save_draft(draft, path)
  propose_block(target, draft, prefix_token_ids, *, temperature=0.0, seed=0)
  Scheduler(policy=..., sps=None, temperatures=None, threshold=None)   verify-length policy
  schedule_verify(confidence[R, P], sps[N+1], *, policy=...) -> lengths [R]
  fit_sts(logits[N, P], prefix_accepted[N, P]) -> temperatures [P]; calibration_report(...)
  restrict_vocab(draft, token_ids) -> a draft proposing over a reduced vocabulary
  full_vocab(draft) -> the same draft proposing over the whole target vocabulary
  Engine(target): device buffers + the jitted loops (init / rounds / insert for servers)
"""

# ---- configs ---------------------------------------------------------------------------------
from dspark_jax.config import ModelConfig, RopeConfig, UnsupportedModelError

# ---- targets and generation -------------------------------------------------------------------
from dspark_jax.target import Target, load_target
from dspark_jax.generation import (GenerationResult, GenerationStats, PromptTooLongError,
                                   generate)
from dspark_jax.checkpoints.hf import CheckpointMismatchError

# ---- drafts ----------------------------------------------------------------------------------
from dspark_jax.drafts.api import Draft, init_draft, propose_block
from dspark_jax.drafts.checkpoint import load_draft, save_draft
from dspark_jax.drafts.config import DraftConfig, DraftConfigError
from dspark_jax.kernels.tree_accept import TreeShape

# ---- scheduling, calibration, engine ----------------------------------------------------------
from dspark_jax.scheduling import (Scheduler, calibration_report, fit_sts, propose_pays,
                                   schedule_verify)
from dspark_jax.drafts.vocab import frequent_tokens, full_vocab, restrict_vocab
from dspark_jax.engine import Engine

# ---- sharding ---------------------------------------------------------------------------------
from dspark_jax.sharding import make_mesh

__version__ = "0.1.0"
