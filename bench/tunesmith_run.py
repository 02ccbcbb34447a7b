"""The tunesmith runner: ``tunesmith.train.recipe.run`` on a RunConfig, in this process.

The config is tunesmith's defaults except what every runner shares (model, data file,
batch, max length, steps, seed, threads) and no mid-run checkpoints or evals. Variants:
``tunesmith`` (train.dtype auto: bf16 autocast where the CPU has a native bf16 path),
``tunesmith-fp32`` (train.dtype fp32), ``tunesmith-precompute`` (DPO with
preference.precompute_ref: true), ``tunesmith-compile`` (train.compile: on; its compile falls in
the warm-up step); for ``bench/gpu_check.py``: ``tunesmith-qlora`` (lora.qlora: true) and
``tunesmith-fsdp2`` (train.distributed: fsdp2 in one process).

Tokens are counted at ``SequenceLogProbs.forward`` — the one forward every tunesmith
method runs — wrapped for the duration of the run; tunesmith's own metrics.jsonl rates
are kept beside ours for comparison (for DPO its ``trained_tokens_per_second`` counts
pairs: the preference method's units).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.measure import Recorder
from bench.workloads import DPO_BETA, LEARNING_RATE, LORA, Spec


def config(spec: Spec, out: Path) -> dict:
    raw = {
        "model": spec.model, "method": spec.method, "full": spec.full,
        "lora": None if spec.full else dict(LORA),
        "data": {"train": spec.data_file, "max_length": spec.max_length, "on_overflow": "drop"},
        "train": {"max_steps": spec.steps, "batch_size": spec.batch, "learning_rate": LEARNING_RATE[spec.workload],
                  "seed": spec.seed, "save_steps": 0, "eval_steps": 0, "logging_steps": 1,
                  "dtype": "fp32" if spec.runner == "tunesmith-fp32" else "auto", "threads": spec.threads,
                  "compile": "on" if spec.runner == "tunesmith-compile" else "off"},
        "output_dir": str(out),
    }
    if spec.runner == "tunesmith-qlora":
        raw["lora"]["qlora"] = True
    if spec.runner == "tunesmith-fsdp2":  # one process: its own one-rank process group
        raw["train"]["distributed"] = "fsdp2"
    if spec.method == "dpo":
        raw["preference"] = {"beta": DPO_BETA, "precompute_ref": spec.runner == "tunesmith-precompute"}
    return raw


def run(spec: Spec, rec: Recorder) -> dict:
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.models import forward
    from tunesmith.train.recipe import run as train

    out = Path(spec.work_dir) / "run"
    raw = config(spec, out)
    cfg = load_config(None, raw=raw)
    original = forward.SequenceLogProbs.forward

    def counted(self, input_ids, labels, attention_mask=None, position_ids=None):
        rec.record(input_ids, labels, attention_mask, position_ids)
        return original(self, input_ids, labels, attention_mask, position_ids)

    forward.SequenceLogProbs.forward = counted
    try:
        manifest = train(cfg)
    except TunesmithError as e:
        if "not available" in str(e):  # precompute_ref while it is being implemented
            return {"pending": True, "error": str(e), "config": raw}
        raise
    finally:
        forward.SequenceLogProbs.forward = original
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steady = [m for m in lines if m.get("step", 0) > spec.warmup and m.get("tokens_per_second") is not None]
    mean = lambda k: round(sum(m[k] for m in steady) / len(steady), 2) if steady else None  # noqa: E731
    return {
        # train.gradient_checkpointing "auto": on only when the memory estimate exceeds RAM (never here)
        "dtype": manifest["dtype"], "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "distributed": manifest["distributed"]["strategy"],  # what was sharded, as run.json says
        "config": raw,
        "reported": {"tokens_per_second": mean("tokens_per_second"),
                     "trained_tokens_per_second": mean("trained_tokens_per_second"),
                     "padding_efficiency": manifest.get("padding_efficiency"),
                     "final_loss": lines[-1].get("loss") if lines else None},
    }
