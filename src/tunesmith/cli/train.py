"""``tunesmith train CONFIG.yaml``: one run of any method, on the shared engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from tunesmith import console
from tunesmith.cli import app

EXAMPLE = """
Example config (sft.yaml):

    model: smollm2-135m-instruct      # or a local folder
    method: sft
    data: {train: data/train.jsonl, eval_split: 0.1, max_length: 512}
    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear}
    train: {epochs: 1, batch_size: 8, learning_rate: 2.0e-4}
    output_dir: runs/sft-demo
"""


# Said where a user reads before running someone else's config: a reward function is code.
TRUST = ("Reward functions (grpo.reward_funcs: `module:function` or `file.py:function`) are imported and run as "
         "ordinary Python with the current directory on sys.path, so they can run arbitrary code: train only with "
         "configs and reward files you trust.")


@app.command(help="Train a model from a run config (YAML).\n\n" + TRUST,
             epilog=EXAMPLE.replace("\n    ", "\n\n    "))
def train(
    config: Path = typer.Argument(..., help="run config YAML"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a field: key.sub=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
    force_resume: bool = typer.Option(False, "--force-resume", help="resume even if training-relevant config changed"),
) -> None:
    from tunesmith.config import dump_yaml, load_config

    cfg = load_config(config, set_ or [])
    if os.environ.get("RANK", "0") == "0":  # once, not per process under torchrun/accelerate
        console.info("resolved config:\n" + dump_yaml(cfg))
    from tunesmith.train.recipe import run

    manifest = run(cfg, resume=resume or force_resume, force_resume=force_resume)
    if manifest.get("signal") == "SIGINT":  # Ctrl-C: the checkpoint is saved, and the shell hears it
        raise SystemExit(130)
