"""The paper's six findings (../shared/docs/PAPER.md) checked against our numbers: each check
runs per (drafter kind, temperature) and the verdict says in how many of them it holds."""

from __future__ import annotations

from taps.study.paper import _COLS, KINDS, pick, variant_means

Rows = dict[str, list[dict]]
Finding = tuple[str, str, str]  # claim, verdict, evidence


def _verdict(held: list[bool]) -> str:
    if not held:
        return "not measured"
    if all(held):
        return f"reproduced ({len(held)}/{len(held)})"
    if not any(held):
        return f"not reproduced (0/{len(held)})"
    return f"partly ({sum(held)}/{len(held)})"


def _tag(kind: str, temp: float) -> str:
    return f"{KINDS[kind]} T={temp:g}"


def specialisation(studies: Rows) -> Finding:
    held, ev = [], []
    for kind, temp in _COLS:
        m = pick(
            studies.get("specialization", []), kind, temp, routing="single", data="mathinstruct"
        )
        s = pick(studies.get("specialization", []), kind, temp, routing="single", data="sharegpt")
        if not all(b in m and b in s for b in ("gsm8k", "math500", "mt_bench")):
            continue
        t = {b: (m[b]["tau"], s[b]["tau"]) for b in ("gsm8k", "math500", "mt_bench")}
        held.append(t["gsm8k"][0] > t["gsm8k"][1] and t["math500"][0] > t["math500"][1]
                    and t["mt_bench"][1] > t["mt_bench"][0])  # fmt: skip
        ev.append(f"{_tag(kind, temp)}: " + ", ".join(f"{b} {a:.2f} vs {c:.2f}"
                                                    for b, (a, c) in t.items()))  # fmt: skip
    claim = ("MathInstruct drafters are best on GSM8K and MATH-500, ShareGPT drafters on "
             "MT-Bench")  # fmt: skip
    return claim, _verdict(held), "math vs ShareGPT drafter; " + "; ".join(ev)


def mixtures(studies: Rows) -> Finding:
    held, ev, dominated = [], [], []
    for kind, temp in _COLS:
        mv = variant_means(studies, kind, temp)
        keys = ("MathInstruct", "ShareGPT", "Mixed (35k+35k)", "Mixed (70k+70k)")
        if not all(k in mv for k in keys):
            continue
        math, share, mix, large = (mv[k] for k in keys)
        held.append(mix > (math + share) / 2)
        dominated.append(large >= mix)
        ev.append(f"{_tag(kind, temp)}: mixed {mix:.2f}, large {large:.2f}, math {math:.2f}, "
                  f"ShareGPT {share:.2f}")  # fmt: skip
    large_note = ("the larger mixture is at least as good everywhere" if dominated
                  and all(dominated) else "the larger mixture does not dominate everywhere")  # fmt: skip
    claim = ("Mixed data is more robust than either single domain (here: its mean tau beats the "
             "mean of the two single-domain drafters); the larger mixture does not dominate at "
             "every temperature")  # fmt: skip
    return claim, _verdict(held), "; ".join(ev) + f"; {large_note}" if ev else ""


def _ranked(studies: Rows, test, claim: str, show: tuple[str, ...]) -> Finding:
    held, ev = [], []
    for kind, temp in _COLS:
        mv = variant_means(studies, kind, temp)
        if show[0] not in mv or not any(k in mv for k in show[1:]):
            continue
        held.append(test(mv))
        ev.append(f"{_tag(kind, temp)}: " + ", ".join(f"{k} {mv[k]:.2f}" for k in show if k in mv))
    return claim, _verdict(held), "; ".join(ev)


def averaging_worst(studies: Rows) -> Finding:
    return _ranked(
        studies,
        lambda mv: all(
            mv["Averaged (a=0.5)"] < v for k, v in mv.items() if k != "Averaged (a=0.5)"
        ),
        "Checkpoint averaging is the worst variant",
        ("Averaged (a=0.5)", "MathInstruct", "ShareGPT", "Confidence routed"),
    )


def confidence_beats_singles(studies: Rows) -> Finding:
    return _ranked(
        studies,
        lambda mv: mv["Confidence routed"] > max(mv.get("MathInstruct", 0), mv.get("ShareGPT", 0)),
        "Confidence routing beats each single-domain drafter on average",
        ("Confidence routed", "MathInstruct", "ShareGPT"),
    )


def merged_best(studies: Rows) -> Finding:
    combos = ("Averaged (a=0.5)", "Confidence routed", "Entropy routed")
    claim, verdict, ev = _ranked(
        studies,
        lambda mv: mv["Merged trees (full)"] > max(mv[k] for k in combos if k in mv),
        "Merged-tree verification gives the highest tau of the combination strategies",
        ("Merged trees (full)", "Merged trees (matched)", *combos),
    )
    return claim, verdict, ev + " (the matched-budget merge verifies as many tokens as one tree)"


def signals(studies: Rows) -> Finding:
    held, ev = [], []
    for kind, temp in _COLS:
        mv = variant_means(studies, kind, temp)
        rows = [r for r in studies.get("routing_signals", []) if r["drafter"] == kind
                and r["temperature"] == temp and r.get("rejected_entropy") is not None
                and r.get("accepted_entropy") is not None]  # fmt: skip
        if "Confidence routed" not in mv or "Entropy routed" not in mv or not rows:
            continue
        acc = sum(r["accepted_entropy"] for r in rows) / len(rows)
        rej = sum(r["rejected_entropy"] for r in rows) / len(rows)
        held.append(mv["Confidence routed"] > mv["Entropy routed"] and rej > acc)
        ev.append(f"{_tag(kind, temp)}: tau confidence {mv['Confidence routed']:.2f} vs "
                  f"entropy {mv['Entropy routed']:.2f}, entropy of accepted {acc:.2f} vs "
                  f"rejected {rej:.2f}")  # fmt: skip
    claim = ("Confidence is a clearer routing signal than entropy; rejected draft tokens have "
             "higher entropy than accepted ones")  # fmt: skip
    return claim, _verdict(held), "; ".join(ev)


def findings(studies: Rows) -> list[Finding]:
    checks = (specialisation, mixtures, averaging_worst, confidence_beats_singles, merged_best,
              signals)  # fmt: skip
    return [f(studies) for f in checks]
