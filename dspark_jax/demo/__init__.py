"""Everything that exists for the demo rather than for the library proper.

  models    embedded demo models (real small LMs shipped as GGUF inside PyPI packages), their
            cache, and the committed demo drafts (`dspark_jax/assets/drafts/`)
  gguf      the torch-free GGUF -> HF conversion those models need
  tiny      tiny random targets (tests) and the quickly-trained "tiny" target
  prompts   training prompts made from the standard library (code, chat, synthetic)

Dependencies point one way: `dspark_jax.demo.tiny` imports `dspark_jax.target`; the library
(`target.load_target`, `drafts.load_draft`) reaches the demo only lazily, through
`resolve_model_name` / `demo_draft_dir`, when a demo name is loaded. Importing this package
loads the model registry and the prompt sources only; `tiny` and `gguf` load when used.
"""

from dspark_jax.demo.models import (DEFAULT_DEMO_MODEL, DEMO_DRAFTS, DEMO_MODELS, DemoModel,
                                    DemoModelNotInstalledError, cache_root, demo_draft_dir,
                                    demo_model_dir, resolve_model_name)
from dspark_jax.demo.prompts import chat_prompts, stdlib_code_prompts, synthetic_prompts
