"""Default serve config: the embedded demo model (SmolLM2-135M-Instruct, offline) with the
committed DSpark demo draft. Override any field: `--config.max_new_tokens=64`."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.target = "smollm2-135m-instruct"  # HF dir, hub id, or an embedded demo model name
  c.draft = "demo"  # draft dir; "demo" = the committed demo draft of the demo target; "" = none
  c.dtype = "float32"  # float32 on CPU; bfloat16 on GPU/TPU
  c.prompts = ""  # JSONL of {"turns": [...]} or {"prompt": ...}; "" = built-in demo prompts
  c.max_prompts = 0  # read at most this many prompts (0 = all)
  c.output = ""  # JSONL of outputs with per-row stats; "" = print only
  c.chat = True  # render prompts with the tokenizer's chat template
  c.max_new_tokens = 96
  c.temperature = 0.0  # 0 = greedy
  c.top_k = 0  # 0 = off
  c.top_p = 1.0  # 1 = off
  c.seed = 0
  c.batch_size = 8  # rows per device batch (padded to a power of two)
  c.num_draft_tokens = 0  # draft tokens verified per round; 0 = the draft's trained block
  # Verify-length policy: auto (early_stop with the cached SPS profile and the draft's
  # sts.json when it has a confidence head, else fixed) | fixed | early_stop | global | async
  c.scheduler = "auto"
  c.warmup = True  # compile on a first batch so tokens/s is steady-state
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  return c
