"""The demo drafts for SmolLM2-135M-Instruct (the embedded model), sized for a 2-core CPU.

Recipe (rerun with `REGENERATE=1 bash scripts/train_demo_drafts.sh ROOT "dspark dflash eagle3"`):
  * data: the 7,473 GSM8K training questions (../shared/data/train/gsm8k_train.jsonl) plus
    768 code and 768 chat prompts built from the standard library, answered by SmolLM2
    itself (T=0.7, top-p 0.8, top-k 20, <= 256 new tokens; resumable, a rerun skips done
    ids). Training uses the rows regenerated so far; a GSM8K question not regenerated yet
    keeps GSM8K's reference answer, calculator annotations removed
    (`data.reference_answers`). The committed draft (2026-12-08) used all 8,241 rows of
    data/demo_v2: every GSM8K question and 768 code/chat prompts (2.25M tokens, 1.50M of them
    in replies), with `--config.data.reference_answers=False`;
  * target features cached once (bf16 tensorstore, length-bucketed, resumable), shared by the
    three drafts;
  * drafts of the same depth (2 layers), taps (1, 14, 27), block 5, Markov rank 64 (DSpark),
    proposing over the 8,192 most frequent reply tokens (q = 0 elsewhere, still lossless),
    32 anchors per sequence (Eagle3: its loss at 32 sampled positions per sequence), AdamW
    1e-3, batch 16, 800 steps (1.6 epochs; ~3 s a step on 2 cores, ~45 min), a checkpoint
    kept every 100 steps (`scripts/tau_curve.sh`).
DeepSpec's recipe (configs/qwen3_*.py) is the same pipeline at 5 layers, block 7, rank 256,
512 anchors, full vocabulary and global batch 512 on ~1.2M regenerated samples.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.target = "smollm2-135m-instruct"
  c.dtype = "float32"
  c.seed = 0
  c.draft.num_layers = 2
  c.draft.block_size = 5
  c.draft.target_layer_ids = (1, 14, 27)
  c.draft.markov_rank = 64
  c.draft.vocab_size = 8192
  c.data.prompts = "../shared/data/train/gsm8k_train.jsonl"
  c.data.num_prompts = 0
  c.data.code_prompts = 768  # the code sets (humaneval, mbpp, livecodebench) need code replies
  c.data.chat_prompts = 768  # and chat (mt-bench, arena-hard): pydoc explain/summarise/rewrite
  c.data.reference_answers = True
  c.data.max_length = 384
  c.data.seq_len = 384
  c.data.min_loss_tokens = 8
  c.data.regen_max_new_tokens = 256
  c.data.regen_batch_size = 64
  c.features.mode = "offline"
  c.train.num_anchors = 32
  c.train.lr = 1e-3
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.epochs = 1
  c.train.max_steps = 800  # ~3 s a step on 2 CPU cores (~45 min)
  c.train.compute_dtype = "float32"
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 8  # every 100 steps kept: tau against training tokens
  c.train.export_frozen = False  # the target supplies embed/LM head: ~29 MB instead of 142 MB
  c.eagle3.ttt_length = 5
  c.eagle3.loss_positions = 32
  c.mesh.data = 1
  return c
