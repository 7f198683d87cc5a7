"""Draft-training data: prompts -> target-regenerated chats -> masked tokens -> fixed-shape batches.

The stages are plain functions so `train.py` (and users) can run any of them alone:

1. `rows`: `read_rows` reads prompts (DeepSpec eval/train JSONL, ShareGPT/OpenAI
   conversations, GSM8K, `{"prompt"}`). Built-in prompt sources that need no data set
   (`stdlib_code_prompts`, `chat_prompts`, `synthetic_prompts`) live in `dspark_jax.demo`.
2. `regenerate`: the target answers every user turn itself (DeepSpec trains the draft on the
   target's own samples), written to JSONL incrementally and resumably.
3. `tokenize`: `tokenize_conversation` / `tokenize_file` render with the tokenizer's chat
   template, build an assistant-only loss mask (assistant body + its end-of-turn marker) and
   write one `.npz`; `load_tokenized` reads it back.
4. `batches`: `BatchIterator`, shuffled fixed-shape `[B, S]` batches whose position is a tiny
   dict, so a restored run sees exactly the batches an uninterrupted one would.

Every name used as `data_lib.X` before the split is re-exported here.
"""

# The prompt sources that moved to the demo package, for `data_lib.stdlib_code_prompts(...)`.
from dspark_jax.demo.prompts import stdlib_code_prompts, synthetic_prompts
from dspark_jax.training.data.batches import BatchIterator
from dspark_jax.training.data.regenerate import regenerate
from dspark_jax.training.data.rows import (DataFormatError, normalize_messages, read_rows,
                                           reference_conversations)
from dspark_jax.training.data.tokenize import (TemplateMismatchError, TokenizedData,
                                               load_tokenized, render_with_spans,
                                               tokenize_conversation, tokenize_file)
