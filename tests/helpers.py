"""Test doubles shared by engine tests, and the experiment scripts loaded as modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from taps.engine.tree import DraftTree
from taps.models.eagle3_head import Eagle3Head
from taps.models.llama import Llama
from taps.training.eagle3 import eagle3_loss

ROOT = Path(__file__).resolve().parents[1]
AUX = (0, 1, 2)  # the tiny target has 2 layers: its embedding stream, after 1, after 2


class _ReadsContext:
    """A proposer double that keeps the decoded text itself: prompt[0] from the decoder's
    `set_prompt` (its catch-up starts at prompt[1:]), then every caught-up token."""

    def __init__(self) -> None:
        self.context: list[int] = []
        self.first: list[int] = []

    def set_prompt(self, prompt: list[int]) -> None:
        self.first = prompt[:1]

    def start(self, features, next_tokens, max_len) -> None:
        self.context = self.first + next_tokens.tolist()

    def commit(self, features, next_tokens) -> None:
        self.context += next_tokens.tolist()


class NoisyOracle(_ReadsContext):
    """A proposer that drafts the target's own greedy continuation, corrupting each token with
    probability `noise`, as two branches. Acceptances of every length happen, so an acceptance
    rule that is off by one position produces wrong output."""

    def __init__(
        self, target: Llama, depth: int = 4, noise: float = 0.3, seed: int = 0, jitter: bool = False
    ) -> None:
        # jitter: random draft log-probs and entropies, so routers switch between drafters.
        self.target, self.depth, self.noise, self.jitter = target, depth, noise, jitter
        self.rng = torch.Generator().manual_seed(seed)
        self.max_tree = 2 * depth + 1
        super().__init__()
        self.heads: list = []  # no draft head: it reads no target layers

    def _greedy(self, n: int) -> list[int]:
        ids = list(self.context)
        for _ in range(n):
            h = self.target(torch.tensor([ids]))[0, -1]
            ids.append(int(self.target.logits(h).argmax()))
        return ids[len(self.context) :]

    def _corrupt(self, toks: list[int]) -> list[int]:
        v = self.target.config.vocab_size
        out = []
        for t in toks:
            if torch.rand((), generator=self.rng) < self.noise:
                t = int(torch.randint(0, v, (), generator=self.rng))
            out.append(t)
        return out

    def propose(self) -> DraftTree:
        truth = self._greedy(self.depth)
        a, b = self._corrupt(truth), self._corrupt(truth)
        d = self.depth
        tokens = [self.context[-1], *a, *b]
        parents = [-1, *range(d), 0, *range(d + 1, 2 * d)]
        n = len(tokens)
        lp = torch.full((n,), -0.1, dtype=torch.float64)
        ent = torch.zeros(n, dtype=torch.float64)
        if self.jitter:
            lp = -torch.rand(n, generator=self.rng, dtype=torch.float64)
            ent = torch.rand(n, generator=self.rng, dtype=torch.float64)
        lp[0] = 0
        scores = lp.clone()
        for i in range(1, n):
            scores[i] += scores[parents[i]]
        return DraftTree(torch.tensor(tokens), parents, lp, scores, ent)


class TopKOracle(_ReadsContext):
    """Drafts the target's own top-2 tokens at each of two levels (a 7-node tree): drafts are
    accepted often and rejected often, so sampling acceptance is exercised on both sides."""

    def __init__(
        self, target: Llama, width: int = 2, offset: int = 0, jitter: torch.Generator | None = None
    ) -> None:
        # offset: draft the target's ranks offset+1 .. offset+width (a worse drafter);
        # jitter: random draft scores and entropies, so routers switch between drafters.
        self.target, self.width, self.offset, self.jitter = target, width, offset, jitter
        self.max_tree = 1 + width + width * width
        super().__init__()
        self.heads: list = []

    def _top(self, ids: list[int]) -> list[int]:
        h = self.target(torch.tensor([ids]))[0, -1]
        return self.target.logits(h).topk(self.width + self.offset).indices[self.offset :].tolist()

    def propose(self) -> DraftTree:
        w = self.width
        first = self._top(self.context)
        tokens, parents = [self.context[-1], *first], [-1] + [0] * w
        for i, t in enumerate(first):
            tokens += self._top(self.context + [t])
            parents += [1 + i] * w
        n = len(tokens)
        lp = torch.tensor([0.0] + [-0.1 * (i + 1) for i in range(n - 1)], dtype=torch.float64)
        ent = torch.zeros(n, dtype=torch.float64)
        if self.jitter is not None:
            lp = lp * (1 + 3 * torch.rand(n, generator=self.jitter, dtype=torch.float64))
            ent = torch.rand(n, generator=self.jitter, dtype=torch.float64)
        return DraftTree(torch.tensor(tokens), parents, lp, lp.clone(), ent)


def _continue(model, x: torch.Tensor, n: int, g: torch.Generator | None) -> torch.Tensor:
    """x [B, t] extended by n tokens of the target's own: greedy (g None) or sampled."""
    for _ in range(n):
        logits = model.logits(model(x)[:, -1])
        nxt = logits.argmax(-1, keepdim=True) if g is None else torch.multinomial(
            torch.softmax(logits, -1), 1, generator=g)  # fmt: skip
        x = torch.cat([x, nxt], 1)
    return x


def train_eagle3(tiny64) -> Eagle3Head:
    """An EAGLE-3 head that drafts well for the tiny target on the prompts the tests decode:
    150 Adam steps of training-time test (2 steps) on the target's own continuations of them,
    greedy and sampled (about 15 s). A random target is learnt only where it was seen, so this
    also shows the objective learns: depth-1 agreement on that data rises above 0.8."""
    from tests.test_engine_greedy import prompts
    from tests.test_engine_sampling_e2e import PROMPT

    model = tiny64.model
    g = torch.Generator().manual_seed(0)
    greedy = [p[:12] + [0] * (12 - len(p[:12])) for p in prompts(5, model.config.vocab_size, 1)]
    with torch.no_grad():
        x = torch.cat([_continue(model, torch.tensor(greedy + [PROMPT]), 32, None),
                       _continue(model, torch.tensor([PROMPT] * 26), 32, g)])  # fmt: skip
        states = model.states(x, capture=AUX)
    aux = torch.cat([states.layers[i] for i in AUX], -1)
    torch.manual_seed(0)
    head = Eagle3Head.for_target(model, AUX).train()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    mask = torch.ones(x.shape[0], x.shape[1] - 1, dtype=torch.uint8)
    for _ in range(150):
        loss, m = eagle3_loss(head, aux[:, :-1], x[:, 1:], states.final[:, 1:], mask, 2, 0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m["step1/top1"]) > 0.8 and float(m["step2/top1"]) > 0.6
    return head.eval().requires_grad_(False)


def experiment_script(name: str) -> ModuleType:
    """experiments/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
