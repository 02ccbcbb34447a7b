"""Curation speed and memory: ``tunesmith data curate`` on a generated set, end to end.

    .venv/bin/python -m bench.curate_bench                   # 200,000 records (~6 min on 2 cores)
    .venv/bin/python -m bench.curate_bench --records 20000

Generates Alpaca-shaped records (instruction 8-16 words, output 20-150 words drawn from the
shared Alpaca demo's vocabulary, 5% planted exact and 5% near duplicates, 1% carrying an eval
item's text), then times, each in its own process: reading alone (the data layer), the whole
curation (read, every rule, the outputs written) on every core and on one, each rule alone on
every core (the others off; normalisation stays on), the language rule added, and every rule
on a quarter of the records (memory growth per record = the indexes). Prints records/s and
peak RSS (the deciding process and the largest worker) per row as JSON lines. The issue's
target: the whole curation at >= 5,000 records/s here.
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
ROWS = {"every rule": {}, "every rule, 1 worker": {}, **ALONE, "every rule + languages [en]": {"languages": ["en"]},
        "every rule, a quarter of the records": {}}


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


def _peak_gib(status: str = "/proc/self/status") -> float:
    with open(status) as f:
        return next(round(int(x.split()[1]) / 2**20, 3) for x in f if x.startswith("VmHWM:"))


def stage(data: str, ev: str, name: str, out: str) -> dict:
    """One row, in this process (the whole curation, as the command runs it)."""
    import resource

    from tunesmith.data import curate as c

    t = time.perf_counter()
    if name == "read":
        from tunesmith.data.readers import read_raw

        n = sum(1 for _ in read_raw(data, []))
        row = {"row": name, "records": n}
    else:
        if name.endswith("a quarter of the records"):
            quarter = Path(out).with_name("quarter.jsonl")
            with open(data) as f, open(quarter, "w") as g:
                g.writelines(line for i, line in enumerate(f) if i % 4 == 0)
            data, t = str(quarter), time.perf_counter()
        result = c.curate([data], out, eval_files=[ev], cfg=c.CurateConfig(**ROWS[name]),
                          workers=1 if "1 worker" in name else None)
        row = {"row": name, "records": result.report["records"], "removed": result.removed}
    s = time.perf_counter() - t
    row.update(seconds=round(s, 2), records_per_s=round(row["records"] / s), peak_rss_gib=_peak_gib(),
               worker_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.curate_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a worker: one row
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help="comma-separated rows to run (default: all)")
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args.data, args.eval, args.stage, args.out)))
        return 0
    with tempfile.TemporaryDirectory(prefix="tunesmith-curate-bench-") as tmp:
        data, ev = generate(Path(tmp), args.records)
        for name in args.rows.split(",") if args.rows else ("read", *ROWS):
            proc = subprocess.run([sys.executable, "-m", "bench.curate_bench", "--stage", name, "--data", str(data),
                                   "--eval", str(ev), "--out", str(Path(tmp) / "out.jsonl")], capture_output=True,
                                  text=True)
            print(proc.stdout.strip() or json.dumps({"row": name, "error": proc.stderr[-500:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
