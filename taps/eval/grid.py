"""The benchmark x temperature grid of one decoder: each cell is decoded (or read from the cell
cache, taps/eval/cells.py) and summarised as one result row, labelled with the variant."""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from taps.combine import Strategy
from taps.data.benchmarks import BenchPrompt, load_benchmark, load_stream
from taps.data.conversations import DataError
from taps.engine.decoder import SpeculativeDecoder
from taps.engine.drafting import TreeSpec
from taps.eval.cells import cell_key, load_cell, store_cell
from taps.eval.evaluate import outputs, run_bench, summarise
from taps.models.linear import onednn_wanted
from taps.models.target import Target
from taps.paths import content_key, file_lock

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("taps.eval")


@dataclass(frozen=True)
class Decoding:
    """How every cell of a grid is decoded; all of it enters the cell key."""

    max_new_tokens: int
    top_p: float = 1.0
    seed: int = 0
    verify_lossless: bool = False
    near_tie: float | None = None  # None: the threshold follows the precision (taps/eval/ties.py)
    record_nodes: bool = True


def temperatures(value: float | Sequence[float]) -> list[float]:
    """`temperature` is one value or a list (both temperatures in one grid)."""
    many = isinstance(value, Sequence) and not isinstance(value, str)
    return [float(x) for x in value] if many else [float(value)]


def load_prompts(
    benchmarks: Sequence[str],
    data_dir: str,
    limit: int | None,
    path: str | None = None,
    stream: dict | None = None,
) -> dict[str, list[BenchPrompt]]:
    """Every benchmark's prompts, read before anything is trained or decoded; a benchmark
    without a prompt is an error (it would report tau 0 over nothing). `stream` (bench=stream:
    `mix` weights, a `seed`, `skip`) builds the mixed session "stream"."""

    def load(b: str) -> list[BenchPrompt]:
        if b == "stream":
            if not stream:
                raise DataError(
                    "benchmark 'stream' needs bench.stream.mix (conf/bench/stream.yaml)"
                )
            mix, seed, skip = dict(stream["mix"]), stream.get("seed", 0), stream.get("skip", 0)
            return load_stream(data_dir, limit, mix, int(seed), int(skip))
        return load_benchmark(b, data_dir, limit, path)

    prompts = {b: load(b) for b in benchmarks}
    for b, qs in prompts.items():
        if not qs:
            where = f"the file {path}" if path else f"benchmark {b}"
            raise DataError(f"{where} has no prompt to decode (empty or blank lines only)")
    return prompts


def variant_labels(
    drafter: str, data: str, drafters: list[str], combine: Strategy, tree: str
) -> dict[str, Any]:
    """The fields that say which variant a row belongs to. `variant` and `routing` (the
    strategy's label) are for display; code selects rows by `strategy`, `options`, `drafter`
    and `data`."""
    data_name = drafters[0] if len(drafters) == 1 else data
    variant = f"{drafter}/{data_name}" + (f"/{combine.label}" if combine.combines else "")
    return {"variant": variant, "routing": combine.label, "strategy": combine.name,
            "options": combine.options, "drafter": drafter, "data": data_name,
            "drafters": drafters, "tree": tree}  # fmt: skip


def machine(device: torch.device) -> dict[str, Any]:
    """Where a cell's timings were measured. Its tokens/s cannot be derived, only measured, so
    the cell key includes the processor, the thread count and the linear kernels: a cell
    decoded elsewhere is decoded again rather than served with another machine's speed."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return {"device": name, "threads": torch.get_num_threads(), "onednn": onednn_wanted()}


def cpu_name() -> str:
    """Model name, family and model of the first processor (one marketing name covers several
    generations), or what `platform` knows where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return " / ".join(fields.get(k, "?") for k in ("model name", "cpu family", "model"))


def cell_parts(
    target: Target, drafters: list[dict], combine: Strategy, spec: TreeSpec,
    decoding: Decoding, eval_settings: dict,
) -> dict[str, Any]:  # fmt: skip
    """What a cell's row depends on besides its benchmark, temperature and prompts (the cell
    key adds those and the code). `drafters`: each head's metadata: its cache key (a published
    head without one is named by the digest of its metadata) and the sha256 of its weights."""
    return {
        "target": target.key,
        "drafters": [[m.get("key") or content_key(m), m.get("weights_sha256")] for m in drafters],
        "routing": combine.name,
        "options": combine.options,
        # Drawn trees decode differently; the others keep the keys they had before the flag.
        "tree": [spec.top_k, spec.depth, spec.total_tokens] + (["sampled"] if spec.sampled else []),
        "max_new_tokens": decoding.max_new_tokens,
        "top_p": decoding.top_p,
        "seed": decoding.seed,
        "dtype": str(target.model.lm_head.weight.dtype),
        "eval": eval_settings,
        "machine": machine(target.device),
    }


@dataclass
class GridResult:
    rows: list[dict]  # one per temperature x benchmark
    outputs: list[dict]  # one per prompt and turn: what was generated (outputs.jsonl)
    decoded: int  # cells decoded (the others came from the cell cache)


def evaluate_grid(
    decoder: SpeculativeDecoder,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, list[BenchPrompt]],
    temps: list[float],
    decoding: Decoding,
    cache_dir: str,
    parts: dict[str, Any],
    labels: dict[str, Any],
    max_depth: int,
) -> GridResult:
    """Every temperature x benchmark cell, decoded unless cached. `max_depth`: the deepest
    draft depth a tree reaches, for acceptance by depth."""
    out = GridResult([], [], 0)
    settings = {k: v for k, v in asdict(decoding).items() if k != "max_new_tokens"}
    for temp in temps:
        for bench, qs in prompts.items():
            cell = {**parts, "bench": bench, "temperature": temp,
                    "prompts": [[q.question_id, q.turns] for q in qs]}  # fmt: skip
            key = cell_key(**cell)
            stored = load_cell(cache_dir, key)
            cached = stored is not None
            if stored is None:  # one process decodes a cell; an identical run waits for it
                with file_lock(Path(cache_dir) / "locks" / f"cell-{key}", f"cell {bench}"):
                    stored = load_cell(cache_dir, key)
                    if stored is None:
                        run = run_bench(decoder, tokenizer, bench, qs, decoding.max_new_tokens,
                                        temp, **settings)  # fmt: skip
                        stored = summarise(run, max_depth, labels["drafters"]), outputs(run)
                        store_cell(cache_dir, key, stored[0], cell, stored[1])
                        out.decoded += 1
            summary, texts = stored
            by_source = summary.get("by_source") or {}
            row = {**labels, **{k: v for k, v in summary.items() if k != "by_source"}, "cell": key}
            out.rows.append(row)
            # A mixed stream: one row per source too (bench = stream/<source>).
            out.rows += [{**labels, **sub, "bench": f"{bench}/{src}", "cell": key}
                         for src, sub in by_source.items()]  # fmt: skip
            out.outputs += [{"variant": row["variant"], **o} for o in texts]
            log.info("%s %s T=%g: tau %.3f (%d turns, %.1f tok/s)%s", row["variant"], bench,
                     temp, row["tau"], row["turns"], row["tokens_per_s"],
                     " [cached]" if cached else "")  # fmt: skip
    return out
