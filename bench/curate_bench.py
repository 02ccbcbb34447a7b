"""Curation speed and memory: ``tunesmith data curate``'s rules on a generated set.

    .venv/bin/python -m bench.curate_bench                   # 200,000 records (~6 min on 2 cores)
    .venv/bin/python -m bench.curate_bench --records 20000

Generates Alpaca-shaped records (instruction 8-16 words, output 20-150 words drawn from the
shared Alpaca demo's vocabulary, 5% planted exact and 5% near duplicates, 1% carrying an eval
item's text), then times, each in its own process (peak RSS is per process): reading (the data
layer), every rule together, and each rule alone (the others off; normalisation stays on, so
every row but "read" includes it); prints records/s and peak RSS per row as JSON lines. The issue's target: the whole curation at ≥ 5,000 records/s here.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path("/work/shared/datasets/llamafactory-demo/alpaca_en_demo.json")
ALONE = {"normalise+exact": dict(near_duplicates=False, decontaminate=False, refusals=False, pii="off"),
         "near_duplicates": dict(exact_duplicates=False, decontaminate=False, refusals=False, pii="off"),
         "decontaminate": dict(exact_duplicates=False, near_duplicates=False, refusals=False, pii="off"),
         "quality+pii": dict(exact_duplicates=False, near_duplicates=False, decontaminate=False)}


def generate(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rnd = random.Random(seed)
    demo = json.loads(DEMO.read_text())
    vocab = sorted({w for r in demo for w in r["output"].split()})
    evals = [{"prompt": r["instruction"], "reference": r["output"]} for r in demo[:200]]
    rows: list[dict] = []
    for i in range(n):
        roll = rnd.random()
        if roll < 0.05 and rows:
            rows.append(dict(rnd.choice(rows)))
        elif roll < 0.10 and rows:
            r = dict(rnd.choice(rows))
            words = r["output"].split()
            words[rnd.randrange(len(words))] = "indeed"
            rows.append({**r, "output": " ".join(words)})
        elif roll < 0.11:
            e = rnd.choice(evals)
            rows.append({"instruction": e["prompt"], "input": "", "output": e["reference"]})
        else:
            rows.append({"instruction": " ".join(rnd.choices(vocab, k=rnd.randint(8, 16))), "input": "",
                         "output": " ".join(rnd.choices(vocab, k=rnd.randint(20, 150)))})
    data, ev = folder / "records.jsonl", folder / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.write_text("".join(json.dumps(e) + "\n" for e in evals))
    return data, ev


def stage(data: str, ev: str, name: str) -> dict:
    """One row, in this process."""
    from tunesmith.data import curate as c

    t = time.perf_counter()
    entries = c.read_inputs([data])
    read_s = time.perf_counter() - t
    out = {"row": name, "records": len(entries)}
    if name == "read":
        out.update(seconds=round(read_s, 2), records_per_s=round(len(entries) / read_s))
    else:
        cfg = c.CurateConfig(**ALONE.get(name, {}))
        t = time.perf_counter()
        result = c.apply_rules(entries, cfg, c.eval_texts([ev]))
        s = time.perf_counter() - t
        out.update(seconds=round(s, 2), records_per_s=round(len(entries) / s), removed=len(result.removed))
    with open("/proc/self/status") as f:
        out["peak_rss_gib"] = next(round(int(x.split()[1]) / 2**20, 3) for x in f if x.startswith("VmHWM:"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.curate_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a worker: one row
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args.data, args.eval, args.stage)))
        return 0
    with tempfile.TemporaryDirectory(prefix="tunesmith-curate-bench-") as tmp:
        data, ev = generate(Path(tmp), args.records)
        for name in ("read", "all rules", *ALONE):
            proc = subprocess.run([sys.executable, "-m", "bench.curate_bench", "--stage", name, "--data", str(data),
                                   "--eval", str(ev)], capture_output=True, text=True)
            print(proc.stdout.strip() or json.dumps({"row": name, "error": proc.stderr[-500:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
