"""The paper's variants, benchmarks and reported numbers, shared by the report (paper.py), the
findings (findings.py) and experiments/combination_table.py. A variant is selected by the row
fields `strategy`, `options` and `data` (taps.report.rows), never by its display label."""

from __future__ import annotations

from dataclasses import dataclass, field

BENCHES = ("mt_bench", "gsm8k", "math500", "svamp")
BENCH_TITLES = ("MT-Bench", "GSM8K", "MATH-500", "SVAMP")
TITLE = dict(zip(BENCHES, BENCH_TITLES, strict=True))
KINDS = {"hass": "HASS", "eagle2": "EAGLE-2"}
# The paper's column order: (drafter kind, temperature).
COLS = (("hass", 0.0), ("eagle2", 0.0), ("hass", 1.0), ("eagle2", 1.0))
# The drafter whose training domain a benchmark belongs to.
IN_DOMAIN = {"mt_bench": "sharegpt", "gsm8k": "mathinstruct", "math500": "mathinstruct",
             "svamp": "mathinstruct"}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One row of the paper's tables: the rows whose `strategy` is `strategy`, whose `options`
    include `options` and (if given) whose `data` is `data`."""

    key: str
    title: str  # the report table's row title
    label: str  # short name in the findings' evidence
    study: str  # the study whose rows fill the report's table
    strategy: str
    options: dict = field(default_factory=dict)
    data: str | None = None
    paper: str | None = None  # its row in the paper's table, if it has one

    def matches(self, row: dict) -> bool:
        opts = row["options"]
        return (row["strategy"] == self.strategy
                and all(opts.get(k) == v for k, v in self.options.items())
                and (self.data is None or row["data"] == self.data))  # fmt: skip


def _single(key: str, title: str, label: str, data: str) -> Variant:
    return Variant(key, title, label, "specialization", "single", data=data, paper=key)


VARIANTS = (
    _single("math", "MathInstruct", "math", "mathinstruct"),
    _single("sharegpt", "ShareGPT", "ShareGPT", "sharegpt"),
    _single("mix", "Mixed (35k+35k)", "mix", "mix"),
    _single("mix_large", "Mixed (70k+70k)", "mix_large", "mix_large"),
    Variant("averaged", "Averaged (a=0.5)", "average(0.5)", "combination", "average",
            {"alpha": 0.5}, paper="averaged"),
    Variant("confidence", "Confidence routed", "confidence", "combination", "confidence",
            paper="confidence"),
    Variant("entropy", "Entropy routed", "entropy", "combination", "entropy"),
    Variant("merged", "Merged trees (full)", "merged(full)", "combination", "merged_tree",
            {"budget": "full"}, paper="merged"),
    Variant("merged_matched", "Merged trees (matched)", "merged(matched)", "combination",
            "merged_tree", {"budget": "matched"}),
)  # fmt: skip
VARIANT = {v.key: v for v in VARIANTS}


def single_variant(data: str) -> Variant:
    """The single drafter trained on `data`: the paper's variant, or one named after it."""
    known = [v for v in VARIANTS if v.strategy == "single" and v.data == data]
    return known[0] if known else Variant(data, data, data, "specialization", "single", data=data)


def select(rows: list[dict], variant: Variant, kind: str, temp: float,
           need: str | None = None) -> dict[str, dict]:  # fmt: skip
    """bench -> the first row of `variant` for one drafter kind and temperature (with field
    `need` set, if given)."""
    out: dict[str, dict] = {}
    for r in rows:
        if (r["drafter"] == kind and r["temperature"] == temp and variant.matches(r)
                and (need is None or r.get(need) is not None)):  # fmt: skip
            out.setdefault(r["bench"], r)
    return out


def cells(rows: list[dict]) -> list[tuple[str, float]]:
    """The (drafter kind, temperature) pairs present, in the paper's column order."""
    have = {(r["drafter"], r["temperature"]) for r in rows}
    order = {c: i for i, c in enumerate(COLS)}
    return sorted(have, key=lambda c: (order.get(c, len(order)), c))


# The paper's Table (Llama-3-8B-Instruct): MT-Bench, GSM8K, MATH-500, SVAMP, average.
_P = {
    "math": ("2.90/5.02/5.35/3.13/4.10", "2.54/5.04/5.28/4.81/4.42",
             "2.31/4.75/4.63/2.46/3.54", "2.43/4.71/4.61/4.53/4.07"),
    "sharegpt": ("3.98/4.09/3.98/4.44/4.12", "3.57/3.72/3.81/3.71/3.70",
                 "3.50/4.03/3.61/3.95/3.77", "3.38/3.72/3.43/3.65/3.54"),
    "mix": ("3.92/4.77/5.02/4.15/4.47", "3.37/4.12/4.44/4.16/4.02",
            "3.46/4.66/4.47/4.57/4.29", "3.10/4.08/4.02/4.03/3.81"),
    "mix_large": ("4.13/5.53/5.67/5.38/5.18", "3.75/4.68/4.85/4.64/4.48",
                  "3.17/4.16/3.42/4.01/3.69", "2.99/3.76/3.20/3.08/3.26"),
    "averaged": ("2.29/2.80/3.12/2.13/2.59", "2.07/2.53/2.57/2.50/2.42",
                 "2.10/2.78/2.90/2.69/2.62", "2.01/2.49/2.42/2.45/2.34"),
    "confidence": ("3.93/5.01/5.37/4.89/4.80", "3.63/4.91/5.25/4.71/4.63",
                   "3.51/4.72/4.55/4.71/4.37", "3.36/4.65/4.62/4.46/4.27"),
    "merged": ("4.05/5.42/5.65/5.31/5.11", "3.93/5.32/5.63/5.25/5.02",
               "3.76/5.21/4.98/5.05/4.75", "3.55/5.01/4.79/4.93/4.57"),
}  # fmt: skip
PAPER = {
    (kind, temp): {v: [float(x) for x in cells[i].split("/")] for v, cells in _P.items()}
    for i, (kind, temp) in enumerate(COLS)
}


def paper_studies() -> dict[str, list[dict]]:
    """The paper's table as rows of our studies (no per-question data, so no intervals)."""
    studies: dict[str, list[dict]] = {}
    for v in VARIANTS:
        fields = {"strategy": v.strategy, "options": dict(v.options),
                  "data": v.data or "mix", "drafters": [v.data] if v.data else
                  ["mathinstruct", "sharegpt"]}  # fmt: skip
        for (kind, temp), table in PAPER.items():
            if v.paper in table:
                studies.setdefault(v.study, []).extend(
                    {"drafter": kind, "temperature": temp, "bench": b, "tau": tau, **fields}
                    for b, tau in zip(BENCHES, table[v.paper], strict=False)
                )
    return studies
