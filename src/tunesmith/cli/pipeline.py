"""``tunesmith run PIPELINE.yaml`` and ``tunesmith quickstart``: the whole workflow in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith import console
from tunesmith.cli import app


@app.command(name="run", help="Run a pipeline file: stages under one folder with lineage; unchanged stages are "
                              "skipped, interrupted ones resumed, changed ones (and what follows) re-run.")
def run_(pipeline: Path = typer.Argument(..., help="pipeline YAML (see examples/pipeline-*.yaml)")) -> None:
    from tunesmith.pipeline import finish, load_pipeline
    from tunesmith.quickstart.run import sections_for

    spec = load_pipeline(pipeline)
    finish(spec, sections_for(spec))


@app.command(help="The tutorial in one command: SFT (LoRA and full) → DPO → base vs SFT vs DPO on held-out prompts "
                  "→ HTML report → exported, verified model, on the embedded SmolLM2 and bundled data.")
def quickstart(
    config: bool = typer.Option(False, "--config", help="print the bundled pipeline file (to copy and edit) and exit"),
    output_dir: Optional[Path] = typer.Option(None, "-o", "--output-dir", help="pipeline folder (default runs/quickstart)"),
    model: Optional[str] = typer.Option(None, help="another base model (default the embedded SmolLM2-135M-Instruct)"),
    scale: float = typer.Option(1.0, min=0.01, max=1.0, help="fraction of the training steps and eval prompts "
                                                            "(a quick smoke run; the figures need 1.0)"),
) -> None:
    from tunesmith.quickstart.run import bundled_text, run_quickstart

    if config:
        console.out.print(bundled_text(), markup=False, highlight=False)
        return
    run_quickstart(output_dir=str(output_dir) if output_dir else None, model=model, scale=scale)
