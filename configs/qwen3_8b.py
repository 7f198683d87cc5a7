"""DSpark draft for Qwen3-8B, DeepSpec's recipe (dspark_qwen3_8b_block7)."""

from configs import common


def get_config():
  c = common.base_config()
  c.target = "Qwen/Qwen3-8B"
  c.draft.target_layer_ids = (1, 9, 17, 25, 33)
  c.draft.mask_token_id = 151669  # first unused row after </think>
  return c
