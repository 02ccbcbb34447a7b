"""One configuration in its own process (peak RSS is per process, so per configuration).

    python -m bench.worker JOB.json RESULT.json

JOB holds ``{"kind": "train", "spec": {...}}`` (bench.workloads.Spec), ``{"kind": "peak"}``
``{"kind": "generate", ...}`` or ``{"kind": "grpo", "variant": ...}``. The result JSON is written even when the run fails
(``ok: false`` with the error), so one broken configuration never stops the benchmark.
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def train(spec) -> dict:
    from transformers import AutoConfig

    from bench import mfu
    from bench.measure import Recorder, peak_memory
    from tunesmith.models import resolve_model

    rec = Recorder().install()
    if spec.runner.startswith("tunesmith"):
        from bench.tunesmith_run import run
    elif spec.runner.startswith("trl"):
        from bench.trl_runs import run
    elif spec.runner == "plain":
        from bench.plain_loop import run
    else:
        raise ValueError(f"unknown runner {spec.runner}")
    rec.begin = time.perf_counter()
    info = run(spec, rec)
    if info.get("pending"):
        return {**info, "ok": False}
    w = rec.window(spec.warmup)
    counts = mfu.param_counts(AutoConfig.from_pretrained(resolve_model(spec.model)),
                              None if spec.full else 8)
    s = w["measured_s"]
    return {**info, **w, **peak_memory(), "ok": True,
            "flops": mfu.window_flops(counts, w, lora=not spec.full), "params": counts,
            "tokens_per_s": round(w["tokens"] / s, 2), "trained_tokens_per_s": round(w["trained_tokens"] / s, 2),
            "pairs_per_s": round(w["rows"] / 2 / s, 3) if spec.method == "dpo" else None}


def main(argv: list[str] | None = None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    with open(job_path) as f:
        job = json.load(f)
    import torch

    torch.set_num_threads(job.get("threads", 2))
    started = time.time()
    try:
        if job["kind"] == "train":
            from bench.workloads import Spec

            result = train(Spec(**job["spec"]))
        elif job["kind"] == "peak":
            from bench.extras import peak

            result = {"ok": True, **peak()}
        elif job["kind"] == "generate":
            from bench.extras import generation

            result = {"ok": True, **generation(job["model"], {int(b): n for b, n in job["new_tokens"].items()},
                                               job.get("llama_cpp", True))}
        elif job["kind"] == "grpo":
            from pathlib import Path

            from bench.extras import grpo_step

            result = {"ok": True, **grpo_step(job["model"], Path(job["work"]), job["variant"], job["steps"],
                                              job["new_tokens"])}
        else:
            raise ValueError(f"unknown job kind {job['kind']}")
    except Exception as e:  # reported in the results, never fatal to the whole benchmark
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    result["wall_s"] = round(time.time() - started, 2)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0 if result.get("ok") or result.get("pending") else 1


if __name__ == "__main__":
    sys.exit(main())
