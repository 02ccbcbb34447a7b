"""SIGTERM and SIGINT at seeded moments to a real ``python -m tunesmith run`` (tiny model, a
data check and two short train stages): after every interruption no trainer outlives the
pipeline, the pipeline exits non-zero saying how to resume, a re-run resumes each stage from
its newest checkpoint (never from scratch once it had one), and the final weights equal those
of an uninterrupted run of the same pipeline byte for byte.

The schedule (which moment, how long after it, which signal) is drawn from ``SEED``; the
moments are files the pipeline and its trainers write, so each signal lands at a known stage
of the work (a trainer starting, just after a checkpoint, as a stage finishes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from test_pipeline import processes_with
from test_train_preference import write_pairs
from test_train_sft import write_sft_data
from tiny import save_tiny_model

SEED = 7  # draws: SIGINT after sft's first checkpoint, SIGTERM as dpo's trainer starts, SIGTERM mid-dpo
REPEATS = 3
STAGES = ("sft", "dpo")
STEPS = 24  # ~10 ms each on the tiny model: a signal just after a checkpoint lands mid-training
TRAIN = {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 4, "eval_steps": 0,
         "dtype": "fp32", "threads": 1}
# Files that appear in this order while the pipeline runs; a signal follows one of them:
# a trainer starting (STAGE.yaml is written just before it), two checkpoints, a stage's end.
MOMENTS = [f"{s}/{m}" if m != "yaml" else f"{s}.yaml" for s in STAGES
           for m in ("yaml", "checkpoint-4", "checkpoint-12", "final")]
RUN_TIMEOUT = 90  # seconds for one `tunesmith run`; a hang fails instead of blocking the suite


def write_signal_pipeline(tmp_path: Path, out: str) -> Path:
    raw = {"name": "signals", "output_dir": out, "model": str(tmp_path / "tiny"), "stages": [
        {"name": "data", "check": ["sft.jsonl", "pairs.jsonl"]},
        {"name": "sft", "train": {"method": "sft", "data": {"train": "sft.jsonl", "max_length": 128},
                                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TRAIN}},
        {"name": "dpo", "train": {"method": "dpo", "init_from": "sft", "data": {"train": "pairs.jsonl",
                                                                               "max_length": 128},
                                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TRAIN}},
    ]}
    path = tmp_path / f"pipeline-{out}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start(tmp_path: Path, pipeline: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith", "run", str(pipeline)], cwd=tmp_path,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})


def stages(out: Path) -> dict:
    path = out / "lineage.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def checkpoint_step(folder: Path) -> int:
    from tunesmith.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(folder) if folder.is_dir() else None
    return int(re.search(r"checkpoint-(\d+)", latest.name)[1]) if latest is not None else 0


def final_weights(out: Path, stage: str) -> dict[str, str]:
    files = sorted((out / stage / "final").glob("*.safetensors"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def losses(out: Path, stage: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / stage / "metrics.jsonl").read_text().splitlines())]


def run_with_signal(tmp_path: Path, pipeline: Path, out: Path, log: Path, seen: set[str],
                    moment: str | None, delay: float, sig: int) -> tuple[int, bool]:
    """Start the pipeline, send ``sig`` ``delay`` s after ``moment`` appears (None: no signal);
    returns (exit code, whether the signal was sent to a live pipeline)."""
    proc = start(tmp_path, pipeline, log)
    sent, deadline = False, time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(m for m in MOMENTS if (out / m).exists())
            if moment is not None and not sent and moment in seen:
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(sig)
                    sent = True
                moment = None
            time.sleep(0.005)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), sent
    finally:
        if proc.poll() is None:  # a hang: do not leave it running behind the test
            proc.kill()
            proc.wait()


def test_signals_at_seeded_moments_never_orphan_a_trainer_and_resume_bit_exactly(tmp_path):
    save_tiny_model(tmp_path / "tiny", layers=2, hidden=32)
    write_sft_data(tmp_path / "sft.jsonl")
    write_pairs(tmp_path / "pairs.jsonl")
    reference = tmp_path / "reference"
    code, _ = run_with_signal(tmp_path, write_signal_pipeline(tmp_path, "reference"), reference,
                              tmp_path / "reference.log", set(), None, 0.0, 0)
    assert code == 0, (tmp_path / "reference.log").read_text()[-3000:]

    rng = random.Random(SEED)
    schedule = [(rng.randrange(3), round(rng.uniform(0.0, 0.05), 3), rng.choice((signal.SIGTERM, signal.SIGINT)))
                for _ in range(REPEATS)]
    pipeline, out = write_signal_pipeline(tmp_path, "signalled"), tmp_path / "signalled"
    seen: set[str] = set()
    interrupted = 0
    for i, (ahead, delay, sig) in enumerate([*schedule, (None, 0.0, 0)]):
        pending = [m for m in MOMENTS if m not in seen]
        moment = pending[min(ahead, len(pending) - 1)] if ahead is not None and pending else None
        had = {s: checkpoint_step(out / s) for s in STAGES}
        tried = {s: len(stages(out).get(s, {}).get("attempts", [])) for s in STAGES}
        log = tmp_path / f"run-{i}.log"
        code, sent = run_with_signal(tmp_path, pipeline, out, log, seen, moment, delay, sig)
        text, where = log.read_text(), f"run {i} of {schedule}, signal after {moment} + {delay} s"

        assert not processes_with(str(out)), f"{where}: a trainer outlived the pipeline\n{text[-3000:]}"
        lineage = stages(out)
        complete = all(lineage.get(s, {}).get("status") == "done" for s in ("data", *STAGES))
        if not complete:  # stopped: non-zero, and the pipeline's last word is one sentence on how to go on
            last = text.strip().splitlines()[-1] if text.strip() else ""
            assert sent and code != 0 and re.match(r"error: .*interrupted by SIG(TERM|INT).*run the same `tunesmith "
                                                   r"run` again", last), f"{where}\n{text[-3000:]}"
            interrupted += 1
        for s in STAGES:  # a stage that had a checkpoint resumed from it: never trained from scratch
            new = lineage.get(s, {}).get("attempts", [])[tried[s]:]
            assert len(new) <= 1 and all(a["from_step"] == had[s] for a in new), f"{where}: {s} {new} had {had}"
            assert not (out / f"{s}.previous").exists(), where
        if ahead is None:
            assert code == 0 and complete, f"{where}\n{text[-3000:]}"
    assert interrupted >= 2, f"signals did not interrupt the pipeline: {schedule}"
    resumed = [a["from_step"] for s in STAGES for a in stages(out)[s]["attempts"] if a["from_step"]]
    assert resumed, f"no stage was resumed from a checkpoint: the schedule {schedule} tested too little"

    for s in STAGES:
        assert final_weights(out, s) == final_weights(reference, s) and final_weights(out, s), s
        assert losses(out, s) == losses(reference, s) and [st for st, _ in losses(out, s)] == list(range(1, STEPS + 1))
