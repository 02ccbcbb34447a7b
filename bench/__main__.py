"""tunesmith against TRL and a plain loop, one configuration per process.

    .venv/bin/python -m bench                       # the full run, 16-19 min on 2 cores
    .venv/bin/python -m bench --quick               # every configuration, a few tiny steps (~6-10 min)
    .venv/bin/python -m bench --only sft-lora --datasets uniform --runners tunesmith,plain --steps 4

Each configuration (workload x dataset x runner) runs in ``python -m bench.worker`` with
``torch.set_num_threads(THREADS)``, one at a time; results go to
``bench/results/<timestamp>.json`` (quick runs: a temp folder unless ``--out``) with the
machine description, and print as rich tables with PASS/FAIL against the issue's targets.
See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench import report
from bench.workloads import (DATASETS, DEFAULT_RUNNERS, DPO_ONLY, RUNNERS, WORKLOADS, Spec, size_for, steps_for,
                             write_data)

console = Console(highlight=False)
if not console.is_terminal:  # piped into a file: keep the wide tables on one line per row
    console = Console(highlight=False, width=220)
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny steps and sequences: checks every path runs")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"workloads, comma-separated: {','.join(WORKLOADS)} ('' = extras only)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="uniform,real")
    p.add_argument("--runners", default=None,
                   help=f"runners, comma-separated (default: the plan in workloads.py): {','.join(RUNNERS)}")
    p.add_argument("--steps", type=int, default=None, help="measured steps per runner (trl-default: half)")
    p.add_argument("--skip", default="", help="extras to skip, comma-separated: generation,grpo,startup,compare")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default bench/results; quick: a temp folder)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default 900, quick 300)")
    args = p.parse_args(argv)
    for name, given, allowed in (("--only", args.only, WORKLOADS), ("--datasets", args.datasets, DATASETS),
                                 ("--runners", args.runners or "", RUNNERS),
                                 ("--skip", args.skip, ("generation", "grpo", "startup", "compare"))):
        bad = [x for x in given.split(",") if x and x not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return args


def plan(args, work: Path, tokenizer) -> list[Spec]:
    specs = []
    wanted = args.runners.split(",") if args.runners else None
    for workload in filter(None, args.only.split(",")):
        for dataset in filter(None, args.datasets.split(",")):
            size = size_for(workload, dataset, args.quick, args.steps)
            runners = [r for r in (wanted or DEFAULT_RUNNERS[(workload, dataset)])
                       if workload.startswith("dpo") or r not in DPO_ONLY]
            for runner in runners:
                warmup, measured, n = steps_for(runner, dataset, size)
                data = write_data(work / "data", workload, dataset, size, n, tokenizer, args.seed)
                specs.append(Spec(workload, dataset, runner, args.model, str(data), size.batch, size.max_length,
                                  warmup, measured, args.seed, args.threads, str(work / "runs" / f"{len(specs):02d}")))
    return specs


def run_job(job: dict, work: Path, name: str, timeout: float) -> dict:
    """One worker subprocess; its JSON result (or why there is none)."""
    job_path, out_path = work / f"{name}.job.json", work / f"{name}.result.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 2)), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log = work / f"{name}.log"
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.worker", str(job_path), str(out_path)],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if out_path.exists():
        result = json.loads(out_path.read_text())
    else:
        tail = log.read_text()[-1500:] if log.exists() else ""
        result = {"ok": False, "error": f"worker exited {rc} without a result", "log_tail": tail}
    result["process_s"] = round(time.perf_counter() - t, 2)
    return result


def machine() -> dict:
    from tunesmith import hardware

    hw = hardware.detect()
    return {**hw.to_dict(), "versions": hardware.library_versions(), "platform": sys.platform,
            "load_average": os.getloadavg()}


def main(argv=None) -> int:
    args = parse(argv)
    timeout = args.timeout or (300 if args.quick else 900)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else (work if args.quick else RESULTS)
    try:
        from tunesmith.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        specs = plan(args, work, tokenizer)
        console.print(f"[bold]tunesmith bench[/bold] {'(quick) ' if args.quick else ''}{len(specs)} configurations, "
                      f"{args.threads} threads; work folder {work}")
        peaks = run_job({"kind": "peak", "threads": args.threads}, work, "peak", timeout)
        if peaks.get("ok"):
            console.print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
        rows = []
        for i, spec in enumerate(specs):
            label = f"{spec.workload}/{spec.dataset}/{spec.runner}"
            r = run_job({"kind": "train", "spec": spec.to_dict(), "threads": args.threads}, work, f"{i:02d}", timeout)
            shutil.rmtree(spec.work_dir, ignore_errors=True)  # full fine-tuning leaves ~2 GB of checkpoints
            rows.append({**spec.to_dict(), **r})
            if r.get("ok"):
                console.print(f"[{i + 1}/{len(specs)}] {label}: {r['trained_tokens_per_s']:.1f} trained tok/s, "
                              f"{r['tokens_per_s']:.1f} tok/s, step {r['step_s_median']:.2f} s, "
                              f"peak {r.get('peak_rss_gib')} GiB ({r['process_s']:.0f} s)")
            else:
                what = "pending" if r.get("pending") else "FAILED"
                console.print(f"[{i + 1}/{len(specs)}] {label}: [yellow]{what}[/yellow] {r.get('error')}")
        gen = startup = compare = grpo = None
        if "generation" not in skip:
            gen = run_job({"kind": "generate", "threads": args.threads, "model": args.model,
                           "new_tokens": {1: 8, 16: 8} if args.quick else {1: 128, 16: 64}}, work, "generate", timeout)
            console.print(report.generation_line(gen))
        if "grpo" not in skip:
            grpo = [run_job({"kind": "grpo", "threads": args.threads, "model": args.model, "work": str(work),
                             "variant": v, "steps": 2 if args.quick else 3, "new_tokens": 8 if args.quick else 64},
                            work, f"grpo-{v}", timeout) for v in ("transformers", "tunesmith")]
            console.print(report.grpo_line(grpo))
        if "startup" not in skip:
            from bench.extras import startup as measure_startup
            from bench.workloads import QUICK

            data = write_data(work / "data", "sft-lora", "uniform", QUICK, 2, tokenizer, args.seed)
            startup = measure_startup(args.model, str(data), work, args.threads)
        if "compare" not in skip:
            from bench.extras import compare_row

            compare = compare_row(args.model, work, prompts=8 if args.quick else 60,
                                  new_tokens=8 if args.quick else 64)
        report.add_ratios_and_mfu(rows, peaks if peaks.get("ok") else None)
        goals = report.targets(rows, startup, gen, grpo)
        result = {"timestamp": stamp, "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
                  "wall_s": round(time.time() - started, 1), "machine": machine(),
                  "threads": args.threads, "matmul_peak_flops": peaks, "training": rows, "generation": gen, "grpo": grpo,
                  "startup": startup, "compare": compare, "targets": goals}
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        if rows:
            console.print(report.training_table(rows))
        for line in report.failures(rows):
            console.print(f"[yellow]{line}[/yellow]", markup=True)
        console.print(report.extras_table(peaks if peaks.get("ok") else None, gen, startup, compare, grpo))
        console.print(report.targets_table(goals))
        console.print(f"results: {path}  ({result['wall_s']:.0f} s)")
        return 0
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)
        if args.out or not args.quick:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
