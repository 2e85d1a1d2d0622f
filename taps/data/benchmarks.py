"""Evaluation prompts: MT-Bench, GSM8K, MATH-500, SVAMP (the TAPS 300) or any MT-Bench-format file.

Files come from the offline data folder; GSM8K and MATH-500 fall back to their hub datasets when
the folder lacks them. MT-Bench and the SVAMP-300 selection have no exact hub equivalent, so a
missing file is an error there."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taps.data.conversations import DATA_DIR_HINT, DataError, check_data_dir, iter_jsonl

log = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = ("mt_bench", "gsm8k", "math500", "svamp")
FILES = {
    "mt_bench": "mt_bench/question.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "math500": "math500/test.jsonl",
    "svamp": "svamp/taps_test300.jsonl",
}
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
}
# single-turn sources: (prompt field, id field or None for the row index)
FIELD = {"gsm8k": ("question", None), "math500": ("problem", "unique_id")}


@dataclass(frozen=True)
class BenchPrompt:
    question_id: str
    category: str
    turns: tuple[str, ...]  # user turns; mt_bench has 2, the others 1
    source: str = ""  # the benchmark it came from, in a mixed stream (bench=stream)


def load_stream(
    data_dir: str | Path | None,
    limit: int | None,
    mix: dict[str, float],
    seed: int = 0,
    skip: int = 0,
) -> list[BenchPrompt]:
    """One session of mixed tasks (bench=stream): `limit` prompts of each benchmark with a
    positive weight in `mix`, after its first `skip` (file order; a held-out stream for checking
    a setting chosen on the first), interleaved in a seeded random order in which each next
    prompt's source is drawn with probability proportional to its weight (among the sources
    with prompts left). Question ids become "<benchmark>/<id>"."""
    bad = [n for n in mix if n not in BENCHMARKS]
    if bad or not mix or any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
        raise DataError(
            f"bench.stream.mix={dict(mix)}: expected non-negative weights, one of them positive, "
            f"for benchmarks among {list(BENCHMARKS)}"
        )
    if skip < 0:
        raise DataError(f"bench.stream.skip must be >= 0, got {skip}")
    last = None if limit is None else skip + limit
    queues = {n: load_benchmark(n, data_dir, last)[skip:] for n, w in mix.items() if w > 0}
    rng = random.Random(seed)
    out: list[BenchPrompt] = []
    while any(queues.values()):
        live = [n for n, q in queues.items() if q]
        name = rng.choices(live, weights=[mix[n] for n in live])[0]
        p = queues[name].pop(0)
        out.append(BenchPrompt(f"{name}/{p.question_id}", p.category, p.turns, source=name))
    return out


def load_benchmark(
    name: str, data_dir: str | Path | None, limit: int | None = None, path: str | None = None
) -> list[BenchPrompt]:
    """The first `limit` prompts (file order) of benchmark `name`.

    name "jsonl" reads the MT-Bench-format file at `path` ({"question_id", "turns": [...]},
    category optional); for the named benchmarks `path`, when given, replaces the default file."""
    if name not in (*BENCHMARKS, "jsonl"):
        raise DataError(f"unknown benchmark {name!r}; valid: {', '.join((*BENCHMARKS, 'jsonl'))}")
    if limit is not None and limit < 0:
        raise DataError(f"benchmark limit must be >= 0, got {limit}")
    if path:
        if not Path(path).is_file():
            raise DataError(f"benchmark file {path} not found")
        return _read_file(name, Path(path), limit)
    if name == "jsonl":
        raise DataError("benchmark 'jsonl' needs a path to an MT-Bench-format .jsonl file")
    check_data_dir(data_dir)  # a mistyped data dir must not silently fall back to the hub
    file = Path(data_dir) / FILES[name] if data_dir else None
    if file is not None and file.is_file():
        return _read_file(name, file, limit)
    missing = str(file) if file is not None else f"<data_dir>/{FILES[name]} (no data dir given)"
    hint = DATA_DIR_HINT
    if name not in HUB:
        raise DataError(f"benchmark file {missing} not found: {hint}")
    try:
        return _read_hub(name, limit)
    except Exception as e:  # offline, renamed repo ...: report both failures together
        raise DataError(
            f"benchmark file {missing} not found ({hint}) and hub {HUB[name][0]} failed: {e}"
        ) from e


def _read_file(name: str, path: Path, limit: int | None) -> list[BenchPrompt]:
    out: list[BenchPrompt] = []
    seen: set[str] = set()
    for row, (lineno, obj) in enumerate(iter_jsonl(path)):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{lineno}"
        if name in FIELD:
            text_key, id_key = FIELD[name]
            turns = [obj.get(text_key)]
            qid = obj.get(id_key, row) if id_key else row
            category, what = name, f"field {text_key!r}"
        else:
            qid = obj.get("question_id", row)
            if "turns" not in obj:
                raise DataError(
                    f"{where}: missing 'turns' (MT-Bench format expected; question_id {qid})"
                )
            turns = obj["turns"]
            category = str(obj.get("category") or (path.stem if name == "jsonl" else name))
            what = "'turns'"
        out.append(_prompt(str(qid), category, turns, where, what))
        if out[-1].question_id in seen:
            raise DataError(f"{where}: duplicate question_id {qid!r}")
        seen.add(out[-1].question_id)
    return out


def _prompt(qid: str, category: str, turns: Any, where: str, what: str) -> BenchPrompt:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {what} must be a non-empty list of prompts (question_id {qid})")
    for k, t in enumerate(turns):
        if not isinstance(t, str) or not t.strip():
            raise DataError(
                f"{where}: {what} holds an empty or non-string prompt (question_id {qid}, turn {k + 1})"
            )
    return BenchPrompt(question_id=qid, category=category, turns=tuple(turns))


def _read_hub(name: str, limit: int | None) -> list[BenchPrompt]:
    from taps.data.sources import hub_offline, hub_reachable

    repo, config, split = HUB[name]
    text_key, id_key = FIELD[name]
    if hub_offline() or not hub_reachable():
        raise ConnectionError("hub offline (HF_HUB_OFFLINE set or huggingface.co unreachable)")
    import datasets  # heavy import, only when the hub is actually tried

    ds = datasets.load_dataset(repo, config, split=split)
    log.info("benchmark %s: loaded from the hub (%s, %d rows)", name, repo, len(ds))
    rows: Iterable[dict] = ds
    out = []
    for i, obj in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        qid = str(obj.get(id_key, i) if id_key else i)
        out.append(_prompt(qid, name, [obj.get(text_key)], f"{repo}[{i}]", repr(text_key)))
    return out
