"""Online drafter selection on the mixed-task stream (experiment=stream): one table per
temperature with tau, tokens/s, draft forwards and verified tokens per cycle for every
strategy, the per-task oracle, and paired 95% intervals of each strategy against hedge (or --ref).

    python experiments/stream_table.py outputs/multiruns/<stamp> [more dirs] [--out F.md]
        [--math mathinstruct] [--chat sharegpt]

The oracle is the right specialist for each prompt's source (the math drafter on GSM8K,
MATH-500 and SVAMP, the ShareGPT drafter on MT-Bench), put together from the two single-drafter
runs question by question: what a router that knew each prompt's task would get.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from omegaconf import OmegaConf

from taps.config import compose_option
from taps.eval.intervals import mean_difference_ci
from taps.eval.metrics import bootstrap_tau
from taps.paths import atomic_write_text
from taps.report.rows import load_rows, tau_cell

CHAT_SOURCES = ("mt_bench",)
ABSENT = {"feedback_every": 1}  # rows from before the option existed caught up every cycle


@functools.cache
def hedge_defaults() -> dict:
    """conf/routing/hedge.yaml's options (what `routing=hedge` decodes with)."""
    cfg = OmegaConf.to_container(compose_option("routing", "hedge"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def name(row: dict) -> str:
    if row["strategy"] == "single":
        return f"single({row['data']})"
    opts = row.get("options") or {}
    if row["strategy"] != "hedge":
        return row["routing"]
    opts = {**ABSENT, **opts}
    defaults = hedge_defaults()  # a hedge row is named by the options that differ from them
    changed = {k: opts.get(k) for k, v in defaults.items() if opts.get(k, v) != v}
    return "hedge" + "".join(f" {k}={v}" for k, v in changed.items())


def oracle(rows: list[dict], math: str, chat: str) -> dict | None:
    """The stream row a task oracle would produce, from the two specialists' rows."""
    by = {r["data"]: r for r in rows if r["strategy"] == "single"}
    if math not in by or chat not in by:
        return None
    per_q, secs = {}, {}
    for q in by[math]["per_question"]:
        who = by[chat] if q.split("/")[0] in CHAT_SOURCES else by[math]
        per_q[q] = who["per_question"][q]
        secs[q] = (who.get("seconds_per_question") or {}).get(q)
    tokens, forwards = (sum(v[i] for v in per_q.values()) for i in (0, 1))
    per_source: dict[str, list[int]] = {}
    for q, (n, f) in per_q.items():
        acc = per_source.setdefault(q.split("/")[0], [0, 0])
        acc[0], acc[1] = acc[0] + n, acc[1] + f
    known = [s for s in secs.values() if s is not None]
    base = by[math]
    return {**base, "strategy": "oracle", "routing": "task oracle", "data": "oracle",
            "tau": tokens / forwards, "per_question": per_q, "tau_ci95": bootstrap_tau(list(per_q.values())),
            "tokens_per_s": tokens / sum(known) if len(known) == len(secs) else None,
            "draft_forwards_per_cycle": None, "phase_ms_per_cycle": None, "tree_tokens_per_cycle": base["tree_tokens_per_cycle"],
            "source_tau": {k: n / f for k, (n, f) in per_source.items()}}  # fmt: skip


def _phases(row: dict) -> str:
    ms = row.get("phase_ms_per_cycle")
    if not ms:
        return "-"
    return f"{ms.get('draft', 0) + ms.get('commit', 0):.0f}, {ms.get('verify', 0):.0f}"


def table(rows: list[dict], temp: float, math: str, chat: str, ref: str = "hedge") -> list[str]:
    stream = [r for r in rows if r["bench"] == "stream" and r["temperature"] == temp]
    asked = {frozenset(r.get("per_question") or ()) for r in stream}
    if len(asked) > 1:  # paired intervals and the oracle need the same questions in every row
        raise ValueError(
            f"T={temp:g}: the stream rows decode different prompts ({sorted(map(len, asked))} "
            "questions): bench.limit, bench.stream.skip or bench.stream.mix differ between the "
            "runs; table each stream separately"
        )
    extra = oracle(stream, math, chat)
    stream += [extra] if extra else []
    hedge = next((r for r in stream if name(r) == ref), None)
    sources = sorted(
        {r["bench"].split("/", 1)[1] for r in rows if r["bench"].startswith("stream/")}
    )
    lines = [f"### T={temp:g}: the mixed stream ({stream[0]['prompts']} prompts)", "",
             "| strategy | tau | " + " | ".join(f"tau {s}" for s in sources)
             + f" | tok/s | draft fwd/cycle | verified/cycle | ms/cycle draft+commit, verify"
             f" | {ref} - this (paired 95%) |",
             "|---" * (7 + len(sources)) + "|"]  # fmt: skip
    for r in stream:
        subs = [next((x for x in rows if x["bench"] == f"stream/{s}" and x["temperature"] == temp
                      and name(x) == name(r)), None) for s in sources]  # fmt: skip
        cells = ["-" if x is None else f"{x['tau']:.2f}" for x in subs]
        if "source_tau" in r:  # the oracle: its own per-source figures, not its base row's
            cells = [f"{r['source_tau'][s]:.2f}" if s in r["source_tau"] else "-" for s in sources]
        diff = ""
        if hedge is not None and r is not hedge:
            d, ci = mean_difference_ci([hedge], [r])
            diff = f"{d:+.2f}" + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")
        fwd, ver, tps = (
            r.get("draft_forwards_per_cycle"),
            r.get("tree_tokens_per_cycle"),
            r.get("tokens_per_s"),
        )
        lines.append(f"| {name(r)} | {tau_cell(r['tau'], r.get('tau_ci95'))} | " + " | ".join(cells)
                     + f" | {'-' if tps is None else f'{tps:.1f}'} | {'-' if fwd is None else f'{fwd:.1f}'}"
                     f" | {'-' if ver is None else f'{ver:.1f}'} | {_phases(r)} | {diff} |")  # fmt: skip
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--math", default="mathinstruct")
    ap.add_argument("--chat", default="sharegpt")
    ap.add_argument("--ref", default="hedge", help="the row the paired intervals compare with")
    args = ap.parse_args()
    rows = [r for r in load_rows(*args.dirs) if r["bench"].startswith("stream")]
    if not rows:
        raise SystemExit(f"no bench=stream rows below {args.dirs}")
    lines = []
    for temp in sorted({r["temperature"] for r in rows}):
        try:
            lines += table(rows, temp, args.math, args.chat, args.ref)
        except ValueError as e:
            raise SystemExit(f"{' '.join(args.dirs)}: {e}") from e
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
