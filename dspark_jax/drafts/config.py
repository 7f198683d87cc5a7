"""Draft architecture config (frozen, hashable; static under jit)."""

from __future__ import annotations

import dataclasses

from dspark_jax.config import FULL, ModelConfig

ALGORITHMS = ("dspark", "dflash", "eagle3")
HEAD_TYPES = ("vanilla", "gated", "rnn")


class DraftConfigError(ValueError):
  """A draft does not fit its target, or a draft setting is invalid."""


@dataclasses.dataclass(frozen=True)
class DraftConfig:
  """Attributes:
    algorithm: "dspark" | "dflash" | "eagle3".
    block_size: P, draft tokens per round the draft was trained for (DSpark: block
      inputs = outputs = P, anchor first; original DFlash: 1 + P inputs; Eagle3: TTT length).
    target_layer_ids: tapped target layers (ascending), their raw outputs feed `fc`.
    layer: geometry of one draft decoder layer (a ModelConfig with `num_layers` draft layers).
    mask_token_id: token whose (frozen, target) embedding fills the non-anchor block slots.
    markov_rank: R; 0 disables the sequential head (DFlash).
    markov_head_type: "vanilla" | "gated" | "rnn".
    confidence_head: whether a confidence head exists.
    confidence_with_markov: confidence input is `[h ; W1[prev]]` (else `h`).
    anchor_first: DSpark/DeepSpec layout (anchor is the first prediction slot); False is the
      original DFlash layout (anchor + P mask slots, predictions at the masks).
    sts_temperatures: per-position STS temperatures for the confidence logits, or None.
    sts_prior: per-position mean conditional acceptance on the calibration rollouts (the
      scheduler's estimate for a request that has no proposed block yet), or None.
    draft_vocab_size: N > 0 restricts proposals to N target tokens (the module's
      `draft_vocab` ids, saved as the `draft_vocab` tensor of the checkpoint): the draft's LM
      head and sampler run over N instead of V columns and q = 0 outside them, which exact
      rejection sampling handles, so decoding stays lossless. 0 = the full vocabulary.
  """

  algorithm: str
  block_size: int
  target_layer_ids: tuple[int, ...]
  layer: ModelConfig
  mask_token_id: int = 0
  markov_rank: int = 0
  markov_head_type: str = "vanilla"
  confidence_head: bool = False
  confidence_with_markov: bool = True
  anchor_first: bool = True
  sts_temperatures: tuple[float, ...] | None = None
  draft_vocab_size: int = 0
  sts_prior: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise DraftConfigError(f"unknown draft algorithm {self.algorithm!r}; expected one of "
                             f"{ALGORITHMS}")
    if self.block_size < (1 if self.algorithm == "eagle3" else 2):
      raise DraftConfigError(f"block_size must be >= 2, got {self.block_size}")
    ids = tuple(self.target_layer_ids)
    if not ids:
      raise DraftConfigError("target_layer_ids is empty")
    if list(ids) != sorted(set(ids)):
      raise DraftConfigError(f"target_layer_ids must be strictly increasing, got {ids}")
    if self.markov_rank and self.markov_head_type not in HEAD_TYPES:
      raise DraftConfigError(f"unknown markov_head_type {self.markov_head_type!r}; expected one "
                             f"of {HEAD_TYPES}")
    if self.markov_rank < 0:
      raise DraftConfigError("markov_rank must be >= 0")
    if not 0 <= self.draft_vocab_size <= self.layer.vocab_size:
      raise DraftConfigError(f"draft_vocab_size must be in [0, {self.layer.vocab_size}], got "
                             f"{self.draft_vocab_size}")
    if self.sts_temperatures is not None and len(self.sts_temperatures) != self.block_size:
      raise DraftConfigError(f"sts_temperatures needs {self.block_size} entries")
    if self.sts_prior is not None and (len(self.sts_prior) != self.block_size or
                                       not all(0.0 <= c <= 1.0 for c in self.sts_prior)):
      raise DraftConfigError(f"sts_prior needs {self.block_size} confidences in [0, 1]")

  @property
  def num_layers(self) -> int:
    return self.layer.num_layers

  @property
  def hidden_size(self) -> int:
    return self.layer.hidden_size

  @property
  def context_dim(self) -> int:
    """C: width of the concatenated tapped features."""
    return len(self.target_layer_ids) * self.layer.hidden_size

  @property
  def block_inputs(self) -> int:
    """Block slots fed to the parallel backbone."""
    return self.block_size if self.anchor_first else self.block_size + 1

  def check_target(self, target: ModelConfig) -> None:
    """Raises DraftConfigError if the draft cannot serve `target`."""
    problems = []
    if self.layer.vocab_size != target.vocab_size:
      problems.append(f"vocab size {self.layer.vocab_size} != target vocab {target.vocab_size}")
    if self.layer.hidden_size != target.hidden_size:
      problems.append(f"hidden size {self.layer.hidden_size} != target hidden "
                      f"{target.hidden_size}")
    bad = [i for i in self.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
      problems.append(f"target_layer_ids {bad} out of range for a {target.num_layers}-layer "
                      "target")
    elif self.target_layer_ids and self.target_layer_ids[-1] == target.num_layers - 1:
      problems.append(f"target layer {target.num_layers - 1} is the last layer; DeepSpec forbids "
                      "tapping it (its HF hidden state is the final-normed one)")
    if not 0 <= self.mask_token_id < target.vocab_size:
      problems.append(f"mask_token_id {self.mask_token_id} outside the vocab")
    if problems:
      raise DraftConfigError("draft does not match the target: " + "; ".join(problems))

  def check_block(self, num_tokens: int) -> None:
    if num_tokens < 1:
      raise DraftConfigError(f"draft length must be >= 1, got {num_tokens}")
    if num_tokens > self.block_size:
      raise DraftConfigError(
          f"requested draft length {num_tokens} exceeds the trained block size "
          f"{self.block_size} of this {self.algorithm} draft (acceptance collapses beyond it)")


def draft_layer_config(target: ModelConfig, num_layers: int) -> ModelConfig:
  """Draft decoder geometry derived from the target, as DeepSpec builds it.

  Every draft layer is a full-attention layer of the target's kind; for Gemma 4 it takes
  the target's *global* geometry (global head dim, global KV heads, proportional RoPE,
  K=V if the target uses it). No per-layer embeddings, no KV sharing.
  """
  full_layers = [i for i, t in enumerate(target.layer_types) if t == FULL]
  ref = full_layers[-1] if full_layers else 0
  return dataclasses.replace(
      target,
      num_layers=num_layers,
      layer_types=(FULL,) * num_layers,
      layer_head_dims=(target.layer_head_dims[ref],) * num_layers,
      layer_kv_heads=(target.layer_kv_heads[ref],) * num_layers,
      head_dim=target.layer_head_dims[ref],
      num_kv_heads=target.layer_kv_heads[ref],
      sliding_window=None,
      rope_sliding=None,
      ple_dim=0,
      ple_vocab_size=0,
      num_kv_shared_layers=0,
      double_wide_mlp=False,
  )
