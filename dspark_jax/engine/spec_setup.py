"""Validated speculative settings shared by `generate` and the continuous batcher."""

from __future__ import annotations

import dataclasses
from typing import Any

from dspark_jax.decoding import speculative
from dspark_jax.engine import profile


@dataclasses.dataclass
class SpecSetup:
  """Validated speculative settings for one `generate` call or batcher."""

  block: int  # P used per round
  verify_lengths: list[int]
  loop: speculative.LoopSpec
  scheduler: Any = None

  @classmethod
  def make(cls, target, draft, num_draft_tokens, verify_lengths, n, acceptance: str = "exact",
           scheduler=None, batch_size: int = 1, tree=None) -> "SpecSetup":
    if tree is not None:
      return cls._make_tree(target, draft, num_draft_tokens, verify_lengths, n, acceptance,
                            scheduler, tree)
    if acceptance not in speculative.ACCEPT_RULES:
      raise ValueError(f"unknown acceptance rule {acceptance!r}; known: "
                       f"{sorted(speculative.ACCEPT_RULES)}")
    dcfg = draft.config
    dcfg.check_target(target.config)
    p = dcfg.block_size if num_draft_tokens is None else int(num_draft_tokens)
    dcfg.check_block(p)
    if verify_lengths is None:
      ver = [p] * n
    else:
      ver = [int(v) for v in (verify_lengths if isinstance(verify_lengths, (list, tuple))
                              else [verify_lengths] * n)]
      if len(ver) != n or any(not 0 <= v <= p for v in ver):
        raise ValueError(f"verify_lengths must be {n} values in [0, {p}]")
    sched = profile.resolve_scheduler(scheduler, target, draft, batch=batch_size, num_draft=p)
    budgets = () if sched is None or sched.policy == "fixed" else speculative.token_budgets(
        batch_size, p)
    loop = speculative.LoopSpec(runtime=draft.runtime, num_draft=p, budgets=budgets,
                                accept_fn=speculative.ACCEPT_RULES[acceptance])
    return cls(block=p, verify_lengths=ver, loop=loop, scheduler=sched)

  @classmethod
  def _make_tree(cls, target, draft, num_draft_tokens, verify_lengths, n, acceptance, scheduler,
                 tree) -> "SpecSetup":
    shape = speculative.TreeShape.parse(tree)
    if not hasattr(draft.runtime, "propose_tree"):
      raise ValueError(f"tree verification needs a block draft (DSpark or DFlash); this draft "
                       f"is {draft.algorithm!r}")
    if acceptance not in speculative.TREE_ACCEPT_RULES:
      raise ValueError(f"unknown tree acceptance rule {acceptance!r}; known: "
                       f"{sorted(speculative.TREE_ACCEPT_RULES)}")
    p = shape.num_draft
    if num_draft_tokens is not None and int(num_draft_tokens) != p:
      raise ValueError(f"num_draft_tokens={num_draft_tokens} but tree {tree!r} has depth {p}")
    if verify_lengths is not None:
      raise ValueError("verify_lengths does not apply to tree verification (every node is "
                       "verified)")
    policy = getattr(scheduler, "policy", scheduler)
    if policy not in (None, "auto", "fixed"):
      raise ValueError(f"tree verification verifies the whole tree; scheduler {policy!r} "
                       "applies to chains only (use scheduler=None)")
    draft.config.check_target(target.config)
    draft.config.check_block(p)
    loop = speculative.LoopSpec(runtime=draft.runtime, num_draft=p,
                                accept_fn=speculative.TREE_ACCEPT_RULES[acceptance], tree=shape)
    return cls(block=p, verify_lengths=[p] * n, loop=loop)

  @property
  def extra_capacity(self) -> int:
    return self.block + 1  # verify writes up to P+1 slots past the committed length
