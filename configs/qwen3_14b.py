"""DSpark draft for Qwen3-14B, DeepSpec's recipe (dspark_qwen3_14b_block7)."""

from configs import common


def get_config():
  c = common.base_config()
  c.target = "Qwen/Qwen3-14B"
  c.draft.target_layer_ids = (1, 10, 19, 28, 37)
  c.draft.mask_token_id = 151669
  return c
