"""The paper's six findings (../shared/docs/PAPER.md), the one implementation: each is graded per
(drafter kind, temperature) on differences of mean tau between variants, with paired 95%
bootstrap intervals over the questions both variants decoded (taps.eval.intervals).

A verdict is **holds** when every difference the claim requires is in the claimed direction
and resolved (its interval excludes 0), **fails** when some required difference is resolved
against the claim, and **unresolved** otherwise. Numbers without per-question data (the
paper's own table) are graded by the direction of the same differences only.

What each claim requires (every difference is "first minus second", claimed > 0):
1. math - ShareGPT drafter on GSM8K and on MATH-500; ShareGPT - math on MT-Bench.
2. robustness: the mixed (35k+35k) drafter beats each single-domain drafter on that
   drafter's weak side: mix - math on MT-Bench, mix - ShareGPT on GSM8K and on MATH-500.
   2b (per drafter kind, across temperatures): the larger mixture does not dominate
   everywhere: mix - mix_large resolved > 0 at some temperature (fails: resolved < 0 at all).
3. every other variant present - average(0.5): averaging is the worst of all of them.
4. confidence - each single drafter it combines (the confidence rows' `drafters`).
5. merged(full) - each other combination strategy (average(0.5), confidence, entropy); the
   matched merge is the same strategy at another budget, shown beside it against confidence
   at equal verification cost, not graded.
6. confidence - entropy in the share of questions routed to the in-domain drafter (math
   benchmarks: MathInstruct, MT-Bench: ShareGPT; unpaired bootstrap over questions), and
   rejected - accepted drafter entropy at draft nodes (bootstrap over the variants' rows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from taps.eval.intervals import mean_difference_ci
from taps.eval.metrics import percentile_interval
from taps.study.variants import (
    IN_DOMAIN,
    KINDS,
    TITLE,
    VARIANT,
    VARIANTS,
    Variant,
    cells,
    select,
    single_variant,
)

HOLDS, FAILS, UNRESOLVED = "holds", "fails", "unresolved"
CLAIMS = {
    "1": "MathInstruct drafters are best on GSM8K and MATH-500, ShareGPT drafters on MT-Bench",
    "2": "Mixed data is more robust than either single domain (here: the mixed drafter beats "
    "each single-domain drafter on that drafter's weak benchmarks)",
    "2b": "The larger mixture does not dominate at every temperature",
    "3": "Checkpoint averaging is the worst variant",
    "4": "Confidence routing beats each single-domain drafter on average",
    "5": "Merged-tree verification gives the highest tau of the combination strategies",
    "6": "Confidence is a clearer routing signal than entropy; rejected draft tokens have "
    "higher entropy than accepted ones",
}
SAMPLES = 2000


@dataclass(frozen=True)
class Comparison:
    """`a` minus `b` (the claim: > 0), their values, and the 95% interval of the difference
    (None: no per-question data to bootstrap)."""

    a: str
    b: str
    a_value: float
    b_value: float
    diff: float
    ci: tuple[float, float] | None
    on: str = ""  # what is compared, when not mean tau over the shared benchmarks

    def state(self, intervals: bool = True) -> str:
        """One of "for", "against", "open": by the interval, or by the sign alone."""
        if intervals and self.ci is None:
            return "open"
        lo, hi = self.ci if intervals else (self.diff, self.diff)
        return "for" if lo > 0 else "against" if hi < 0 else "open"

    def text(self) -> str:
        head = f"{self.a} {self.a_value:.2f} - {self.b} {self.b_value:.2f}"
        head += f" {self.on}" if self.on else ""
        if self.ci is None:
            return f"{head}: {self.diff:+.2f}"
        tag = {"for": "resolved", "against": "resolved against", "open": "not resolved"}
        ci = f"[{self.ci[0]:+.2f}, {self.ci[1]:+.2f}]"
        return f"{head}: {self.diff:+.2f} {ci}, {tag[self.state()]}"


@dataclass(frozen=True)
class Verdict:
    """One finding on one (drafter kind, temperature); temperature None: across temperatures."""

    finding: str
    kind: str
    temperature: float | None
    grade: str
    required: tuple[Comparison, ...]
    extra: tuple[Comparison, ...] = ()  # shown beside the claim, not graded

    @property
    def cell(self) -> str:
        t = "" if self.temperature is None else f" T={self.temperature:g}"
        return f"{KINDS.get(self.kind, self.kind)}{t}"


def grade(comparisons: list[Comparison], intervals: bool = True, every: bool = True) -> str:
    """holds / fails / unresolved for "every difference > 0" (or "some", every=False)."""
    states = [c.state(intervals) for c in comparisons]
    if every:
        if all(s == "for" for s in states):
            return HOLDS
        return FAILS if "against" in states else UNRESOLVED
    if "for" in states:
        return HOLDS
    return FAILS if all(s == "against" for s in states) else UNRESOLVED


def compare(a: str, rows_a: dict[str, dict], b: str, rows_b: dict[str, dict],
            on: str = "") -> Comparison:  # fmt: skip
    """Mean tau of `a` minus `b` over their shared benchmarks, with the paired interval."""
    shared = [x for x in rows_a if x in rows_b]
    ra, rb = [rows_a[x] for x in shared], [rows_b[x] for x in shared]
    diff, ci = mean_difference_ci(ra, rb)
    va, vb = (_mean([r["tau"] for r in rs]) for rs in (ra, rb))
    return Comparison(a, b, va, vb, diff, ci, on)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _on(rows: dict[str, dict], bench: str) -> dict[str, dict]:
    return {bench: rows[bench]} if bench in rows else {}


class _Cell:
    """The rows of one drafter kind at one temperature."""

    def __init__(self, rows: list[dict], kind: str, temp: float) -> None:
        self.rows, self.kind, self.temp = rows, kind, temp

    def of(self, v: Variant, need: str | None = None) -> dict[str, dict]:
        return select(self.rows, v, self.kind, self.temp, need)


Parts = tuple[list[Comparison], list[Comparison]] | None  # required, extra; None: not measured


def _per_bench(c: _Cell, pairs: list[tuple[Variant, Variant, str]]) -> Parts:
    out = []
    for a, b, bench in pairs:
        ra, rb = _on(c.of(a), bench), _on(c.of(b), bench)
        if not ra or not rb:
            return None
        out.append(compare(a.label, ra, b.label, rb, f"on {TITLE.get(bench, bench)}"))
    return out, []


def specialisation(c: _Cell) -> Parts:
    """1: math - ShareGPT on GSM8K and MATH-500, ShareGPT - math on MT-Bench."""
    m, s = VARIANT["math"], VARIANT["sharegpt"]
    return _per_bench(c, [(m, s, "gsm8k"), (m, s, "math500"), (s, m, "mt_bench")])


def mixtures(c: _Cell) -> Parts:
    """2: the mixed drafter minus each single-domain drafter on that drafter's weak side."""
    mix, m, s = VARIANT["mix"], VARIANT["math"], VARIANT["sharegpt"]
    return _per_bench(c, [(mix, m, "mt_bench"), (mix, s, "gsm8k"), (mix, s, "math500")])


def averaging_worst(c: _Cell) -> Parts:
    """3: every other variant present minus average(0.5)."""
    avg = VARIANT["averaged"]
    mine = c.of(avg)
    got = [(v, c.of(v)) for v in VARIANTS if v is not avg]
    found = [compare(v.label, rows, avg.label, mine) for v, rows in got
             if mine and rows.keys() & mine.keys()]  # fmt: skip
    return (found, []) if found else None


def confidence_beats_singles(c: _Cell) -> Parts:
    """4: confidence minus each single drafter it combines."""
    conf = c.of(VARIANT["confidence"])
    parts = list(dict.fromkeys(d for r in conf.values() for d in r.get("drafters") or []))
    singles = [single_variant(d) for d in parts]
    if not conf or not singles or not all(c.of(v).keys() & conf.keys() for v in singles):
        return None
    return [compare("confidence", conf, v.label, c.of(v)) for v in singles], []


def merged_best(c: _Cell) -> Parts:
    """5: merged(full) minus each other combination strategy; the matched merge beside."""
    full = c.of(VARIANT["merged"])
    others = [v for v in VARIANTS if v.strategy not in ("single", "merged_tree")]
    found = [compare("merged(full)", full, v.label, c.of(v)) for v in others
             if full and c.of(v).keys() & full.keys()]  # fmt: skip
    if not found:
        return None
    matched, conf = c.of(VARIANT["merged_matched"]), c.of(VARIANT["confidence"])
    extra = []
    if matched and matched.keys() & conf.keys():
        extra.append(compare("merged(matched)", matched, "confidence", conf, "at equal cost"))
    return found, extra


def _bootstrap(values: list[list[float]], seed: int) -> torch.Tensor | None:
    """Replicates of the mean over groups of each group's mean, resampling within groups."""
    if any(len(v) < 2 for v in values):
        return None
    gen = torch.Generator().manual_seed(seed)
    reps = []
    for v in values:
        data = torch.tensor(v, dtype=torch.float64)
        reps.append(data[torch.randint(0, len(v), (SAMPLES, len(v)), generator=gen)].mean(1))
    return torch.stack(reps).mean(0)


def _in_domain(rows: dict[str, dict]) -> list[list[float]]:
    """Per benchmark, 1/0 per question: routed to the benchmark's in-domain drafter."""
    out = []
    for bench, r in rows.items():
        n = len(r.get("per_question") or {}) or r.get("prompts") or 1
        k = round(r["routing_shares"]["questions"].get(IN_DOMAIN[bench], 0.0) * n)
        out.append([1.0] * k + [0.0] * (n - k))
    return out


def _difference(a: str, av: list[list[float]], b: str, bv: list[list[float]], on: str,
                paired: bool = False) -> Comparison:  # fmt: skip
    """Mean of a's group means minus b's, with a bootstrap interval: unpaired (independent
    resamples), or paired element by element (the same resampled indices for both)."""
    ma, mb = (_mean([_mean(v) for v in vs]) for vs in (av, bv))
    ra, rb = _bootstrap(av, 0), _bootstrap(bv, 0 if paired else 1)
    ci = None if ra is None or rb is None else percentile_interval(ra - rb)
    return Comparison(a, b, ma, mb, ma - mb, ci, on)


def signals(c: _Cell) -> Parts:
    """6: in-domain question share, confidence - entropy routing; rejected - accepted entropy."""
    routed = {s: c.of(VARIANT[s], need="routing_shares") for s in ("confidence", "entropy")}
    shared = [b for b, r in routed["confidence"].items() if b in routed["entropy"]
              and IN_DOMAIN.get(b) in (r.get("drafters") or [])]  # fmt: skip
    stats = [r for v in VARIANTS for r in c.of(v, need="rejected_entropy").values()
             if r.get("accepted_entropy") is not None]  # fmt: skip
    if not shared or not stats:
        return None
    conf, ent = ({b: routed[s][b] for b in shared} for s in ("confidence", "entropy"))
    clarity = _difference("confidence", _in_domain(conf), "entropy", _in_domain(ent),
                          "in-domain question share")  # fmt: skip
    rej, acc = ([[r[f"{w}_entropy"] for r in stats]] for w in ("rejected", "accepted"))
    higher = sum(r["rejected_entropy"] > r["accepted_entropy"] for r in stats)
    on = f"entropy at draft nodes, higher in {higher}/{len(stats)} rows"
    gap = _difference("rejected", rej, "accepted", acc, on, paired=True)
    return [clarity, gap], []


CHECKS: dict[str, Callable[[_Cell], Parts]] = {
    "1": specialisation,
    "2": mixtures,
    "3": averaging_worst,
    "4": confidence_beats_singles,
    "5": merged_best,
    "6": signals,
}


def larger_mixture(rows: list[dict], kind: str, intervals: bool = True) -> Verdict | None:
    """2b for one drafter kind: mix - mix_large at each temperature; holds if some is > 0."""
    mix, large = VARIANT["mix"], VARIANT["mix_large"]
    found = []
    for k, temp in cells(rows):
        a, b = select(rows, mix, k, temp), select(rows, large, k, temp)
        if k == kind and a.keys() & b.keys():
            found.append(compare("mix", a, "mix_large", b, f"at T={temp:g}"))
    if not found:
        return None
    return Verdict("2b", kind, None, grade(found, intervals, every=False), tuple(found))


def grade_all(rows: list[dict], intervals: bool = True) -> list[Verdict]:
    """Every measurable finding on every (drafter kind, temperature) of `rows`, then 2b per
    drafter kind. intervals=False grades by the direction of the differences only."""
    out = []
    for kind, temp in cells(rows):
        cell = _Cell(rows, kind, temp)
        for finding, check in CHECKS.items():
            parts = check(cell)
            if parts is not None:
                req, extra = parts
                out.append(Verdict(finding, kind, temp, grade(req, intervals), tuple(req),
                                   tuple(extra)))  # fmt: skip
    for kind in dict.fromkeys(k for k, _ in cells(rows)):
        v = larger_mixture(rows, kind, intervals)
        out += [v] if v else []
    return out


def variant_means(rows: list[dict], kind: str, temp: float) -> list[tuple[str, float]]:
    """(label, mean tau over its benchmarks) for every variant present, best first."""
    got = [(v.label, select(rows, v, kind, temp)) for v in VARIANTS]
    means = [(lb, sum(r["tau"] for r in rs.values()) / len(rs)) for lb, rs in got if rs]
    return sorted(means, key=lambda m: -m[1])


GRADING = ("Each claim is graded per drafter kind and temperature on differences of mean tau "
           "over the benchmarks, each with a paired 95% bootstrap interval over the prompts both "
           "variants decoded: **holds** = every difference the claim requires is in the claimed "
           "direction and resolved (its interval excludes 0); **fails** = some required "
           "difference is resolved against the claim; **unresolved** = neither.")  # fmt: skip


def evidence_line(v: Verdict) -> str:
    """The verdict and the numbers it rests on, one line."""
    text = f"**{v.grade}**: " + "; ".join(c.text() for c in v.required)
    if v.extra:
        text += "; not graded: " + "; ".join(c.text() for c in v.extra)
    return text


def _summary(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return "not in the table"
    grades = [v.grade for v in verdicts]
    if len(set(grades)) == 1:
        return f"{grades[0]} ({len(grades)}/{len(grades)})"
    return ", ".join(f"{v.cell} {v.grade}" for v in verdicts)


def verdict_table(ours: list[Verdict], paper: list[Verdict] | None = None) -> list[str]:
    """Markdown: one row per finding, one column per (drafter kind, temperature), and, given
    `paper`, a last column summarising the paper's table graded the same way."""
    cols = list(dict.fromkeys((v.kind, v.temperature) for v in ours if v.temperature is not None))
    heads = [f"{KINDS.get(k, k)} T={t:g}" for k, t in cols]
    extra = " the paper's table (direction only) |" if paper is not None else ""
    lines = ["| # | the paper's claim | " + " | ".join(heads) + " |" + extra,
             "|---" * (2 + len(cols) + (paper is not None)) + "|"]  # fmt: skip
    for finding, claim in CLAIMS.items():
        mine = {(v.kind, v.temperature): v.grade for v in ours if v.finding == finding}
        if finding == "2b" or not mine:
            continue
        row = [f"**{mine[c]}**" if c in mine else "-" for c in cols]
        last = f" {_summary([v for v in paper if v.finding == finding])} |" if extra else ""
        lines.append(f"| {finding} | {claim} | " + " | ".join(row) + " |" + last)
    return lines


def across_temperatures(ours: list[Verdict], paper: list[Verdict] | None = None) -> list[str]:
    """The 2b line: per drafter kind, across temperatures."""
    mine = [v for v in ours if v.finding == "2b"]
    if not mine:
        return []
    text = ", ".join(f"{v.cell} **{v.grade}**" for v in mine)
    theirs = [v for v in paper or [] if v.finding == "2b"]
    if theirs:
        text += "; the paper's table: " + ", ".join(f"{v.cell} {v.grade}" for v in theirs)
    claim = CLAIMS["2b"][0].lower() + CLAIMS["2b"][1:]
    return [f"Finding 2b, {claim} (per drafter kind, across temperatures): {text}."]
