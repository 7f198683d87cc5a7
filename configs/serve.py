"""Default serve config: the embedded demo model (SmolLM2-135M-Instruct, offline) with the
committed DSpark demo draft. Override any field: `--config.max_new_tokens=64`."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.mode = "batch"  # batch (prompts -> JSONL) | server (OpenAI-compatible HTTP) | chat (CLI)
  c.target = "smollm2-135m-instruct"  # HF dir, hub id, or an embedded demo model name
  c.draft = "demo"  # draft dir; "demo" = the committed demo draft of the demo target; "" = none
  c.dtype = "float32"  # float32 on CPU; bfloat16 on GPU/TPU
  c.prompts = ""  # JSONL of {"turns": [...]} / {"prompt": ...}; "" = built-in demo prompts
  c.max_prompts = 0  # read at most this many prompts (0 = all)
  c.output = ""  # JSONL of outputs, appended as rows finish; a rerun resumes it; "" = print
  c.chat = True  # render prompts with the tokenizer's chat template
  c.max_new_tokens = 96  # per turn (batch, chat); the most a server request may ask for
  # Longest prompt accepted (longer: HTTP 400 / an "error" row in batch jobs; 0 = what the
  # model's context leaves). It sizes the KV cache: each admission allocates its rows' share
  # and each decode round reads all of it. SmolLM2 on 2 CPU cores, 4 demo prompts: 0.7 s to
  # admit them and 1.6x faster rounds at 1,024 than at the model's 8,192 (13 s to admit).
  c.max_prompt_len = 1024
  c.temperature = 0.0  # 0 = greedy (batch and chat; server requests bring their own)
  c.top_k = 0  # 0 = off
  c.top_p = 1.0  # 1 = off
  c.stop = ()  # stop strings for batch jobs, e.g. --config.stop="('\n\n',)"
  c.n = 1  # samples per prompt (batch)
  c.seed = 0  # sampling seed; a row draws with (seed, its request id, its step) only
  c.batch_size = 8  # decode slots: rows decoded together (continuous batching)
  c.rounds_per_step = 4  # decode rounds per device call between admissions
  c.num_draft_tokens = 0  # draft tokens verified per round; 0 = the draft's trained block
  # Verify-length policy: auto (early_stop with the cached SPS profile and the draft's
  # sts.json when it has a confidence head, else fixed) | fixed | early_stop | global | async
  c.scheduler = "auto"
  # Token-tree verification (DSpark/DFlash drafts): children per depth, e.g. "2,2,1,1,1";
  # "" = chain. With a tree every node is verified, so the scheduler is not used.
  c.tree = ""
  c.warmup = True  # batch: compile on a short first request so tokens/s is steady-state
  # Keep compiled programs in the user cache dir (<cache>/xla): later runs start faster
  c.compilation_cache = True
  c.host = "127.0.0.1"  # server
  c.port = 8000  # server
  c.model_name = ""  # server: the model id clients send ("" = the target name)
  c.max_waiting = 256  # server: queued requests beyond the slots; more get HTTP 429
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  return c
