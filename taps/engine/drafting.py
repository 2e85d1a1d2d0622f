"""A draft head with its own KV cache, building EAGLE-2 dynamic trees (ALGORITHMS.md section 4).

The head sees pairs (f_t, x_{t+1}) at position t. After `start`/`commit` its cache holds every
committed pair and `last_g` is the output at the newest one, which predicts the token after
the root. Drafting appends tree nodes to the cache and rolls them back afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from taps.engine.tree import DraftTree
from taps.models.heads import AnyHead
from taps.models.llama import TargetStates


@dataclass(frozen=True)
class TreeSpec:
    top_k: int = 10
    depth: int = 5  # expansion rounds after the first layer: depth + 1 draft layers
    total_tokens: int = 60  # root included
    name: str = "custom"  # the conf/tree/ option it came from, for result rows
    # At T > 0, a static tree of drafts *drawn* from the head: every level has top_k children
    # drawn without replacement, the first drawn one expanded, up to total_tokens; verified by
    # recursive rejection against the draft distribution. At T = 0 the usual dynamic tree.
    sampled: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.depth < 0 or self.total_tokens < 2:
            raise ValueError(f"tree: need top_k >= 1, depth >= 0, total_tokens >= 2; got {self}")

    def draft_levels(self, temperature: float) -> int:
        """Draft levels a tree can have: depth + 1, or for a drawn spine (T > 0) as many
        levels of top_k as total_tokens - 1 reaches."""
        if self.sampled and temperature > 0:
            return min(self.depth + 1, -(-(self.total_tokens - 1) // self.top_k))
        return self.depth + 1


def _entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def _log_softmax(logits: Tensor) -> Tensor:
    # At least float32 for scores and entropies; drafts need no more (verification decides).
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)


class HeadDrafter:
    def __init__(self, head: AnyHead, spec: TreeSpec, index: int = 0) -> None:
        self.head = head
        self.spec = spec
        self.index = index
        self.cache = None
        self.last_g: Tensor | None = None
        # The head's outputs at the pairs of the last catch-up, after the output before it:
        # row i predicts the i-th caught-up token (online routers score drafters with them).
        self.predictions: Tensor | None = None
        self.root: int | None = None
        self.max_tree = spec.total_tokens
        self.temperature = 0.0  # the decoding temperature: sampled trees draw at it
        self.generator: torch.Generator | None = None
        self._draft_ids: Tensor | None = None  # target id of every draft index (drawn trees)

    def set_sampling(self, temperature: float, generator: torch.Generator | None) -> None:
        """The decoder's temperature and random generator, which sampled trees draw with."""
        self.temperature, self.generator = temperature, generator

    @property
    def heads(self) -> list[AnyHead]:
        return [self.head]

    @property
    def device(self) -> torch.device:
        return self.head.fc.weight.device

    @torch.no_grad()
    def start(self, states: TargetStates, next_tokens: Tensor, max_len: int) -> None:
        """Prefill: the prompt's target states, next_tokens [n] = prompt[1:] + root."""
        need = max_len + self.spec.top_k * (self.spec.depth + 1)
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.head.new_cache(need)
        self.cache.truncate(0)
        self.last_g = None
        self.commit(states, next_tokens)

    @torch.no_grad()
    def commit(self, states: TargetStates, next_tokens: Tensor) -> None:
        """Catch up on accepted pairs: target states of the root and accepted nodes, each
        paired with the token that followed it (the last one being the new root). The head
        takes what it reads from them: f for EAGLE-1/2, fc of its layers for EAGLE-3."""
        x = self.head.input_features(states).to(self.device, self.head.fc.weight.dtype)
        g = self.head(x[None], next_tokens[None].to(self.device), cache=self.cache)
        before = [] if self.last_g is None else [self.last_g[None]]
        self.predictions = torch.cat([*before, g[0, :-1]])
        self.last_g = g[0, -1]
        self.root = int(next_tokens[-1])

    @torch.no_grad()
    def propose(self) -> DraftTree:
        if self.spec.sampled and self.temperature > 0:
            return self._propose_sampled()
        k, head = self.spec.top_k, self.head
        committed = self.cache.length
        logp = _log_softmax(head.logits(self.last_g))
        top = logp.topk(k)
        # Candidate lists: token, parent candidate (-1 = root), score, own log-prob, entropy.
        tok = head.to_target(top.indices).tolist()
        par = [-1] * k
        score = top.values.tolist()
        lp = list(score)
        ent = [float(_entropy(logp))] * k
        depth = [1] * k
        frontier = list(range(k))
        # A candidate's head output is its children's feature input, and every frontier's
        # parents are the previous level's rows, so one level of outputs is all it keeps. The
        # bookkeeping stays in Python lists and each level costs a fixed number of tensor ops
        # (per-row tensor indexing cost ~0.4 ms of a ~9 ms draft at tree=cpu_wide on 2 cores).
        prev = self.last_g[None]  # outputs of the previous level (the root's: last_g)
        row_of = {-1: 0}  # candidate -> row of its output in its level's outputs
        slot: dict[int, int] = {}  # candidate -> cache slot offset after `committed`
        for _ in range(self.spec.depth):
            feats = prev[[row_of[par[c]] for c in frontier]][None]
            toks = torch.tensor([tok[c] for c in frontier], device=self.device)[None]
            pos = torch.tensor([committed + depth[c] - 1 for c in frontier], device=self.device)
            mask = self._level_mask(frontier, par, slot, committed)
            g = head(feats, toks, pos[None], self.cache, mask.to(self.device))[0]
            logp = _log_softmax(head.logits(g))
            top = logp.topk(k, dim=-1)
            ents, vals = _entropy(logp).tolist(), top.values.tolist()
            ids = head.to_target(top.indices).tolist()
            children, base = [], len(slot)
            for row, c in enumerate(frontier):
                slot[c], row_of[c] = base + row, row
                for v, t in zip(vals[row], ids[row], strict=True):
                    tok.append(t)
                    par.append(c)
                    score.append(score[c] + v)
                    lp.append(v)
                    ent.append(ents[row])
                    depth.append(depth[c] + 1)
                    children.append(len(tok) - 1)
            prev = g
            frontier = sorted(children, key=lambda i: -score[i])[:k]
        self.cache.truncate(committed)
        return self._rerank(tok, par, score, lp, ent, depth)

    def _propose_sampled(self) -> DraftTree:
        """The static spine: top_k children drawn at each level, the first drawn one expanded.
        Its shape never depends on what was drawn, which keeps recursive rejection lossless."""
        head, room = self.head, self.spec.total_tokens - 1
        committed = self.cache.length
        tok, par, lp, score, ent, dists = [self.root], [-1], [0.0], [0.0], [0.0], {}
        g, parent = self.last_g, 0
        for level in range(self.spec.depth + 1):
            logits = head.logits(g)
            logp = _log_softmax(logits)
            ids, dists[parent] = self._draw(logits, min(self.spec.top_k, room - len(tok) + 1))
            e = float(_entropy(logp))
            tok += head.to_target(ids).tolist()
            new = logp[ids].tolist()
            lp += new
            score += [score[parent] + v for v in new]
            par += [parent] * len(ids)
            ent += [e] * len(ids)
            if level == self.spec.depth or len(tok) > room:
                break
            parent = len(tok) - len(ids)  # the first drawn child of this level
            toks = torch.tensor([[tok[parent]]], device=self.device)
            g = head(g[None, None], toks, cache=self.cache)[0, 0]  # sees its whole spine
        self.cache.truncate(committed)
        return DraftTree(
            tokens=torch.tensor(tok), parents=par, logprobs=torch.tensor(lp, dtype=torch.float64),
            scores=torch.tensor(score, dtype=torch.float64),
            entropies=torch.tensor(ent, dtype=torch.float64), drafter=self.index,
            draft_forwards=level + 1, draft_dists=dists,
        )  # fmt: skip

    def _draw(self, logits: Tensor, k: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """k draft-vocabulary ids drawn without replacement from q = softmax(logits / T), in
        draw order, and (target ids, q) for acceptance."""
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("draft head: non-finite logits while drawing a tree")
        q = torch.softmax(logits.double() / self.temperature, -1).cpu()
        k = min(k, int((q > 0).sum()))
        ids = torch.multinomial(q, k, replacement=False, generator=self.generator)
        return ids.to(logits.device), (self._target_ids(q.shape[-1]), q)

    def _target_ids(self, n: int) -> Tensor:
        """Target id of each of the n draft indices, checked one-to-one once: acceptance
        places q on target ids, and two draft rows of one token would merge their mass."""
        if self._draft_ids is None or len(self._draft_ids) != n:
            ids = self.head.to_target(torch.arange(n, device=self.device)).cpu()
            if len(torch.unique(ids)) != n:
                raise ValueError("tree.sampled needs a draft vocabulary without repeated "
                                 "target tokens (d2t maps two draft rows to one token)")  # fmt: skip
            self._draft_ids = ids
        return self._draft_ids

    @staticmethod
    def _level_mask(
        frontier: list[int], par: list[int], slot: dict[int, int], committed: int
    ) -> Tensor:
        """Bool [len(frontier), committed + drafted + len(frontier)]: each frontier row sees
        the committed context, its drafted ancestors' cache slots and itself."""
        base = len(slot)
        rows, cols = [], []
        for row, c in enumerate(frontier):
            a = par[c]
            while a >= 0:
                rows.append(row)
                cols.append(committed + slot[a])
                a = par[a]
            rows.append(row)
            cols.append(committed + base + row)
        mask = torch.zeros(len(frontier), committed + base + len(frontier), dtype=torch.bool)
        mask[:, :committed] = True
        mask[rows, cols] = True
        return mask

    def _rerank(self, tok, par, score, lp, ent, depth) -> DraftTree:
        """Keep the total_tokens - 1 best candidates. Sorting by (score desc, depth asc) puts
        every parent before its children (a child's score never exceeds its parent's), so
        the kept set is closed under ancestors even with ties."""
        order = sorted(range(len(tok)), key=lambda i: (-score[i], depth[i], i))
        keep = sorted(order[: self.spec.total_tokens - 1], key=lambda i: (depth[i], -score[i], i))
        index = {c: i + 1 for i, c in enumerate(keep)}
        return DraftTree(
            tokens=torch.tensor([self.root] + [tok[c] for c in keep]),
            parents=[-1] + [0 if par[c] < 0 else index[par[c]] for c in keep],
            logprobs=torch.tensor([0.0] + [lp[c] for c in keep], dtype=torch.float64),
            scores=torch.tensor([0.0] + [score[c] for c in keep], dtype=torch.float64),
            entropies=torch.tensor([0.0] + [ent[c] for c in keep], dtype=torch.float64),
            drafter=self.index,
            draft_forwards=1 + self.spec.depth,
        )
