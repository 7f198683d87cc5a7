"""DSpark draft for Gemma 4 12B (it), DeepSpec's recipe (dspark_gemma4_12b_block7).

Draft layers take the target's global-attention geometry (global head dim, K=V, proportional
RoPE); the Gemma 4 chat template's empty thought channel prefixes every reply and is
excluded from the loss, as in DeepSpec.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.target = "google/gemma-4-12B-it"
  c.draft.target_layer_ids = (5, 17, 29, 41, 46)
  c.draft.mask_token_id = 4  # <mask>
  c.data.assistant_prefix = "<|channel>thought\n<channel|>"
  return c
