"""Compatibility alias: the tiny targets moved to `dspark_jax.demo.tiny`.

Kept because several test modules import `dspark_jax.testing`; new code should import
`dspark_jax.demo.tiny`.
"""

from dspark_jax.demo.tiny import (CHATML_TEMPLATE, TINY_CHARS, TINY_SPECIALS, TINY_VERSION,
                                  TINY_WORDS, hf_config_dict, random_target, tiny_config,
                                  tiny_corpus, tiny_model_dir, tiny_tokenizer_files,
                                  train_tiny_target, write_tiny_model_dir)
