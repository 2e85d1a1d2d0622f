"""The user-facing settings of a run, checked before anything is loaded, trained or decoded:
a bad value fails in the first second with the key, the value and what is allowed, instead of
minutes later inside torch (or, worse, as a meaningless result)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

DTYPES = (None, "auto", "float32", "bfloat16", "float16")


class SettingsError(ValueError):
    """One or more settings are invalid; the message lists each with its key."""


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _check(problems: list[str], key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        problems.append(f"{key}={value!r}: expected {allowed}")


def _temperatures(value: Any) -> list[Any]:
    many = isinstance(value, Sequence) and not isinstance(value, str)
    return list(value) if many else [value]


def _decoding(cfg: DictConfig, problems: list[str]) -> None:
    temps = _temperatures(cfg.temperature)
    ok = bool(temps) and all(_number(t) is not None and _number(t) >= 0 for t in temps)
    _check(problems, "temperature", cfg.temperature, ok, "a number >= 0 (0 = greedy) or a list")
    top_p = _number(cfg.top_p)
    _check(problems, "top_p", cfg.top_p, top_p is not None and 0 < top_p <= 1, "0 < top_p <= 1")
    n = _int(cfg.max_new_tokens)
    _check(problems, "max_new_tokens", cfg.max_new_tokens, n is not None and n >= 1, "int >= 1")
    _check(problems, "seed", cfg.seed, _int(cfg.seed) is not None, "an integer")


def _bench(bench: DictConfig, problems: list[str]) -> None:
    names = bench.get("benchmarks")
    ok = isinstance(names, Sequence) and not isinstance(names, str) and len(names) > 0
    _check(problems, "bench.benchmarks", names, ok, "a non-empty list of benchmark names")
    limit = bench.get("limit")
    ok = limit is None or (_int(limit) is not None and limit >= 1)
    _check(problems, "bench.limit", limit, ok, "null (every prompt) or an integer >= 1")
    if OmegaConf.is_missing(bench, "path"):
        problems.append("bench.path is missing: bench=jsonl needs bench.path=FILE.jsonl")
        return
    path = bench.get("path")
    if path is not None:
        p = Path(str(path))
        what = "a directory" if p.is_dir() else "not found" if not p.exists() else None
        if what is None and not _readable(p):
            what = "not readable"
        _check(problems, "bench.path", path, what is None, f"a readable .jsonl file ({what})")


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError:
        return False
    return True


def _tree(tree: DictConfig, problems: list[str]) -> None:
    for key, low in (("top_k", 1), ("depth", 0), ("total_tokens", 2)):
        v = tree.get(key)
        ok = _int(v) is not None and v >= low
        _check(problems, f"tree.{key}", v, ok, f"an integer >= {low}")


def _drafter(drafter: DictConfig, problems: list[str]) -> None:
    if OmegaConf.is_missing(drafter, "path"):
        problems.append(
            f"drafter.path is missing: drafter={drafter.get('name')} uses a published or "
            "exported head as is; give drafter.path=<dir or hub id>"
        )
    elif drafter.get("objective") is None and not drafter.get("path"):
        problems.append(f"drafter={drafter.get('name')}: no objective to train and no path")
    kind = drafter.get("kind", "eagle2")
    _check(problems, "drafter.kind", kind, kind in ("eagle2", "eagle3"), "eagle2 or eagle3")
    aux = drafter.get("aux_layers")
    ok = aux is None or (
        kind == "eagle3"
        and isinstance(aux, Sequence)
        and not isinstance(aux, str)
        and len(aux) > 0
        and all(_int(i) is not None and i >= 0 for i in aux)
        and len(set(aux)) == len(aux)
    )
    _check(problems, "drafter.aux_layers", aux, ok,
           "null or distinct layer ids >= 0 (EAGLE-3 heads only)")  # fmt: skip
    steps = drafter.get("ttt_steps")
    ok = steps is None or (_int(steps) is not None and steps >= 1)
    _check(problems, "drafter.ttt_steps", steps, ok, "an integer >= 1")


def _data(data: DictConfig, problems: list[str]) -> None:
    mode = data.get("features", "cached")
    _check(problems, "data.features", mode, mode in ("cached", "online", "auto"),
           "cached, online or auto")  # fmt: skip


def _eval(ev: DictConfig, problems: list[str]) -> None:
    _check(problems, "eval.dtype", ev.get("dtype"), ev.get("dtype") in DTYPES,
           f"one of {list(DTYPES)}")  # fmt: skip
    tie = ev.get("near_tie")
    ok = tie is None or (_number(tie) is not None and tie >= 0)
    _check(problems, "eval.near_tie", tie, ok, "null (follow the precision) or a number >= 0")
    exact = ev.get("exact", False)
    _check(problems, "eval.exact", exact, isinstance(exact, bool), "true or false")
    lazy = ev.get("lazy_logits_from")
    ok = lazy is None or (_int(lazy) is not None and lazy >= 2)
    _check(problems, "eval.lazy_logits_from", lazy, ok, "null or an integer >= 2")


CHECKS: dict[str, Callable[[DictConfig, list[str]], None]] = {
    "bench": _bench,
    "tree": _tree,
    "drafter": _drafter,
    "data": _data,
    "eval": _eval,
}


def validate(cfg: DictConfig) -> None:
    """Raise SettingsError listing every invalid setting of a run's config (names the keys)."""
    problems: list[str] = []
    _decoding(cfg, problems)
    for node, check in CHECKS.items():
        if node in cfg:
            check(cfg[node], problems)
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
