"""A tiny end-to-end run (CPU, ~1 minute): tiny random target with a char tokenizer, tiny
DSpark draft. External checks point it at their own target and data:
  python train.py --config=configs/tiny.py --config.target=DIR --config.data.prompts=F.jsonl
"""

from configs import common


def get_config():
  c = common.base_config()
  c.target = "tiny"  # created on first use under the user cache dir
  c.dtype = "float32"
  c.seed = 0
  c.draft.num_layers = 1
  c.draft.block_size = 4
  c.draft.markov_rank = 16
  c.data.synthetic_fallback = 256  # built-in prompts unless another source (data.prompts) is set
  c.data.max_length = 128
  c.data.seq_len = 128
  c.data.min_loss_tokens = 4
  c.data.regen_max_new_tokens = 64
  c.data.regen_temperature = 1.0
  c.data.regen_top_p = 1.0
  c.data.regen_top_k = 0
  c.data.regen_batch_size = 64
  c.train.num_anchors = 16
  c.train.lr = 3e-3
  c.train.global_batch_size = 16
  c.train.micro_batch_size = 8
  c.train.epochs = 25
  c.train.compute_dtype = "float32"
  c.train.export_dtype = "float32"
  c.train.log_every = 5
  c.train.checkpoint_every = 20
  c.eagle3.ttt_length = 4
  c.mesh.data = 1
  return c
