"""Build a training mixture (e.g. 35k math + 35k ShareGPT) and hold out a validation split."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taps.data.conversations import Conversation, DataError
from taps.data.sources import SOURCES, load_source
from taps.data.user import (
    FORMATS,
    USER_SOURCES,
    component_label,
    file_fingerprint,
    load_hf,
    load_jsonl,
)

log = logging.getLogger(__name__)


@dataclass
class DataSplit:
    train: list[Conversation]
    val: list[Conversation]
    info: dict  # JSON-serialisable description: components, seed, holdout, totals, shares


def build_mixture(
    components: list[dict],
    data_dir: str | Path | None,
    seed: int = 42,
    holdout: float = 0.02,
    prefer: str = "auto",
) -> DataSplit:
    """Load each component, sample it, merge, shuffle and hold out a validation split.

    Sampling rule (deterministic for a seed and the source content): each source is loaded in
    full (ShareGPT offline parses in under a second; MathInstruct is 262k short rows) and
    `examples` conversations are drawn from it with `random.Random(f"{seed}:{source}")`
    without replacement, keeping source order; `examples: null` (or more than available, with
    a warning) takes all. The merged list is shuffled with `random.Random(seed)` and its first
    `round(holdout * n)` conversations (at least 1 when holdout > 0 and n >= 2) become `val`."""
    specs = _check(components, holdout)
    pool: list[tuple[str, Conversation]] = []  # (component label, conversation)
    parts = []
    for spec in specs:
        name, want = spec["label"], spec["examples"]
        convs, part = _load(spec, data_dir, prefer)
        if want is not None and want > len(convs):
            log.warning("%s: %d examples requested, only %d available", name, want, len(convs))
        if want is not None and want < len(convs):
            keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(convs)), want))
            convs = [convs[k] for k in keep]
        pool += [(name, c) for c in convs]
        parts.append({"source": name, **part, "requested": want, "used": len(convs)})
    random.Random(seed).shuffle(pool)
    n = len(pool)
    n_val = round(holdout * n)
    if holdout > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    val, train = pool[:n_val], pool[n_val:]
    counts = Counter(name for name, _ in train)
    info: dict[str, Any] = {
        "components": parts,
        "seed": seed,
        "holdout": holdout,
        "totals": {"train": len(train), "val": len(val), "all": n},
        "shares": {p["source"]: counts[p["source"]] / max(len(train), 1) for p in parts},
    }
    return DataSplit(train=[c for _, c in train], val=[c for _, c in val], info=info)


def _load(spec: dict, data_dir: str | Path | None, prefer: str) -> tuple[list, dict]:
    """A component's conversations and what the results say of where they came from."""
    if spec["source"] == "jsonl":
        convs = load_jsonl(spec["path"], spec["label"], spec.get("format"))
        return convs, {"origin": f"{spec['path']} (the user's JSONL)", "offline": True,
                       "available": len(convs), "fingerprint": file_fingerprint(spec["path"])}  # fmt: skip
    if spec["source"] == "hf":
        convs, fp = load_hf(spec["name"], spec.get("split") or "train", spec.get("subset"),
                            spec.get("format"), spec["label"])  # fmt: skip
        return convs, {"origin": f"{spec['name']} (hub)", "offline": False,
                       "available": len(convs), "fingerprint": fp}  # fmt: skip
    convs, src = load_source(spec["source"], data_dir, prefer=prefer)
    return convs, {"origin": src.origin, "offline": src.offline, "available": src.kept,
                   "fingerprint": src.fingerprint}  # fmt: skip


def select_budget(components: Any, budget: str | None) -> list[dict]:
    """Resolve each component's `examples`: a count, null, or a mapping from budget name
    (e.g. cpu, paper) to a count, of which `data.budget` picks one."""
    if not isinstance(components, Sequence) or isinstance(components, str):
        raise DataError("data.components must be a non-empty list of {source, examples}")
    out = []
    for i, comp in enumerate(components):
        want = comp.get("examples") if isinstance(comp, Mapping) else None
        if isinstance(want, Mapping):
            if budget not in want:
                raise DataError(
                    f"data.components[{i}].examples has no entry for data.budget={budget!r} "
                    f"(has: {', '.join(map(str, want))})"
                )
            comp = {**comp, "examples": want[budget]}
        out.append(comp)
    return out


def _check(components: Any, holdout: Any) -> list[dict]:
    """Validate the config; errors name the offending key."""
    if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise DataError(f"data.holdout must be a number in [0, 1), got {holdout!r}")
    if not isinstance(components, Sequence) or isinstance(components, str) or not components:
        raise DataError("data.components must be a non-empty list of {source, examples}")
    specs, seen = [], set()
    for i, comp in enumerate(components):
        key = f"data.components[{i}]"
        if not isinstance(comp, Mapping) or "source" not in comp:
            raise DataError(f"{key} must be a mapping with a 'source' key, got {comp!r}")
        name, want = comp["source"], comp.get("examples")
        if name not in SOURCES and name not in USER_SOURCES:
            valid = ", ".join((*SOURCES, *USER_SOURCES))
            raise DataError(f"{key}.source={name!r} is not one of {valid}")
        allowed, required = USER_SOURCES.get(name, (set(), set()))
        extra = set(comp.keys()) - {"source", "examples"} - allowed
        if extra:
            ok = ", ".join(sorted({"source", "examples"} | allowed))
            raise DataError(f"{key} has unknown keys {sorted(extra)}; allowed: {ok}")
        missing = sorted(k for k in required if not comp.get(k))
        if missing:
            raise DataError(f"{key} (source={name}) needs {', '.join(missing)}")
        if comp.get("format") not in (None, *FORMATS):
            raise DataError(f"{key}.format={comp['format']!r}: expected one of {FORMATS}")
        label = component_label(comp)
        if label in seen:  # two samples of one source could overlap
            raise DataError(f"{key}.source={name!r} appears twice; use one entry per source")
        seen.add(label)
        if want is not None and (not isinstance(want, int) or isinstance(want, bool) or want < 0):
            raise DataError(f"{key}.examples must be a non-negative integer or null, got {want!r}")
        specs.append({**comp, "examples": want, "label": label})
    return specs
