"""What the engine records per decoding cycle, for tau and for the analyses built on it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CycleStats:
    accepted: int  # draft tokens accepted this cycle (the bonus token not counted)
    tree_size: int  # tokens verified in the target forward, root included
    drafter: int  # which drafter's tree was verified
    draft_forwards: int  # head forwards spent drafting this cycle (all drafters)
    route_scores: list[float] | None = None  # each drafter's routing score (higher preferred)
    node_confidence: list[float] = field(default_factory=list)  # exp(cum log-prob), per node
    node_entropy: list[float] = field(default_factory=list)
    node_depth: list[int] = field(default_factory=list)
    node_accepted: list[bool] = field(default_factory=list)


@dataclass
class Generation:
    tokens: list[int]  # new tokens (EOS included if produced), truncated to max_new_tokens
    target_forwards: int  # prefill included: vanilla decoding has tau == 1 exactly
    wall_time_s: float
    cycles: list[CycleStats] = field(default_factory=list)
    # Greedy decoding: the target's top-1 logit and its gap to the top-2 where each token was
    # chosen (vanilla: every step; speculative: the verified row that chose it), for telling
    # a divergence at a floating-point near-tie from a bug (taps/eval/ties.py).
    top2_gaps: list[float] = field(default_factory=list)
    top1_logits: list[float] = field(default_factory=list)
    # Seconds per phase of the loop (prefill, draft, verify, accept, commit): the profile.
    phase_s: dict[str, float] = field(default_factory=dict)

    @property
    def tau(self) -> float:
        """New tokens per target forward (prefill counts as the forward that yields token 1)."""
        return len(self.tokens) / max(self.target_forwards, 1)
