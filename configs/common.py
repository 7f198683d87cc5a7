"""Shared pieces of the draft-training configs: DeepSpec's hyperparameters as defaults.

Every config's `get_config()` returns a ConfigDict built by `base_config()` plus a few
per-target overrides. All fields can be overridden on the command line
(`--config.train.lr=3e-4`); unknown fields are rejected (lock_config).
"""

import ml_collections


def base_config():
  c = ml_collections.ConfigDict()
  c.target = ""  # HF directory, hub id or embedded demo model name (required)
  c.algorithm = "dspark"  # dspark | dflash | eagle3
  c.seed = 42
  c.dtype = "bfloat16"  # target parameter dtype (float32 on CPU)

  c.draft = ml_collections.ConfigDict()
  c.draft.num_layers = 5  # draft decoder layers (Eagle3: set 1 as DeepSpec does)
  c.draft.block_size = 7  # P: draft tokens per round (anchor is the first slot)
  c.draft.target_layer_ids = ()  # tapped target layers; () = evenly spaced from 1 to L-3
  c.draft.mask_token_id = -1  # -1 = the target's pad id
  c.draft.markov_rank = 256  # R of the low-rank Markov head (DSpark)
  c.draft.markov_head_type = "vanilla"  # vanilla | gated | rnn
  c.draft.confidence_head = True
  c.draft.anchor_first = True  # False = original DFlash layout (anchor + P masks)
  c.draft.vocab_size = 0  # > 0: propose over the N most frequent reply tokens (0 = full vocab)
  c.draft.init_from = ""  # initialise from an existing draft directory

  c.data = ml_collections.ConfigDict()
  c.data.prompts = ""  # JSONL of prompts ({"turns"}, {"conversations"}, {"question"}, {"prompt"})
  c.data.num_prompts = 0  # 0 = all
  c.data.code_prompts = 0  # extra prompts built from the Python stdlib's sources
  c.data.chat_prompts = 0  # extra chat prompts (some multi-turn) about the stdlib's docs
  c.data.synthetic_prompts = 0  # short built-in prompts (tiny smoke runs)
  c.data.reference_answers = False  # also train on prompts' shipped answers (GSM8K) not regenerated
  c.data.synthetic_fallback = 0  # short built-in prompts used only if no other source gives any
  c.data.system_prompt = ""  # "" = none
  c.data.assistant_prefix = ""  # text prefixed to every reply and excluded from the loss
  c.data.max_length = 4096  # tokens per training sequence (right-truncated)
  c.data.min_loss_tokens = 14  # drop samples with fewer assistant tokens
  c.data.seq_len = 4096  # padded batch length (>= max_length keeps every token)
  c.data.regen_max_new_tokens = 4096
  c.data.regen_temperature = 0.7  # DeepSpec's regeneration sampling (Qwen3 non-thinking)
  c.data.regen_top_p = 0.8
  c.data.regen_top_k = 20
  c.data.regen_batch_size = 32

  c.features = ml_collections.ConfigDict()
  c.features.mode = "online"  # online: target features inside the train step; offline: cache
  c.features.cache_dir = ""  # offline cache dir ("" = <workdir>/features)

  c.train = ml_collections.ConfigDict()
  c.train.num_anchors = 512  # blocks per sequence
  c.train.loss_ce = 0.1
  c.train.loss_l1 = 0.9
  c.train.loss_conf = 1.0
  c.train.loss_decay_gamma = 4.0  # position weights exp(-k / gamma)
  c.train.lr = 6e-4
  c.train.warmup_ratio = 0.04
  c.train.max_grad_norm = 1.0
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.global_batch_size = 512  # sequences per optimizer step
  c.train.micro_batch_size = 8  # sequences per accumulation step (split over data/fsdp)
  c.train.epochs = 10
  c.train.max_steps = 0  # > 0 caps the run (and the LR schedule) at this many steps
  c.train.compute_dtype = "bfloat16"  # master weights stay float32
  c.train.log_every = 10
  c.train.checkpoint_every = 3000
  c.train.keep_checkpoints = 2
  # --mode=export: 0 = the latest checkpoint (-> <workdir>/draft); N = step N's, if kept
  # (-> <workdir>/draft_stepN)
  c.train.export_step = 0
  c.train.export_dtype = "bfloat16"  # dtype of the exported draft (DeepSpec ships bf16)
  # Write the frozen embedding / LM head copies into the export, as DeepSpec does (its own
  # loader needs them; dspark_jax uses the target's and does not).
  c.train.export_frozen = True

  c.eagle3 = ml_collections.ConfigDict()
  c.eagle3.ttt_length = 7
  c.eagle3.step_loss_decay = 0.8
  c.eagle3.loss_positions = 0  # > 0: loss at K sampled positions per row (cheaper estimate)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
