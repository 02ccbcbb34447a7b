"""``tunesmith eval|compare|report``: measure models, compare them item by item, write a report.

    tunesmith eval runs/sft-demo --suite instruction_following --suite loss     # → runs/sft-demo/eval/
    tunesmith eval runs/sft-demo --suite accuracy --data qa.jsonl --mc loglik
    tunesmith compare smollm2-135m-instruct runs/sft-demo --prompts instruction_following --limit 12 \\
        --max-new-tokens 32 --html cmp.html
    tunesmith report runs/sft-demo runs/dpo-demo --comparison evals/20250101-120000 --html report.html

MODEL: a run folder (or its final/), an exported folder, a base model name or folder, or
a PEFT adapter folder. SUITE: a built-in name, NAME=FILE (your records for that suite),
or a file (suite records, or plain prompts shown side by side).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from tunesmith import console
from tunesmith.cli import app
from tunesmith.errors import TunesmithError
from tunesmith.infer import DTYPE_HELP, GENERATION_BATCH

_MODELS = "models: run folders, exports, base model names/folders or adapter folders"
_SUITE = ("instruction_following, refusal_harmful, refusal_benign, accuracy, loss, preference; NAME=FILE for your "
          "records; a suite/prompt file; or lm-eval:TASK[,TASK...] (lm-evaluation-harness) (repeatable)")

# Options shared by eval and compare (typer reads these default objects, it does not mutate them).
MAX_NEW_TOKENS = typer.Option(256, "--max-new-tokens", help="tokens generated at most per prompt")
BATCH_SIZE = typer.Option(GENERATION_BATCH, "--batch-size", help="prompts decoded (or sequences scored) together")
LIMIT = typer.Option(None, "--limit", help="only the first N records of each suite (quick runs)")
TEMPERATURE = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic)")
TOP_P = typer.Option(1.0, "--top-p", help="nucleus sampling mass (with temperature > 0)")
SEED = typer.Option(0, "--seed", help="sampling seed")
MAX_LENGTH = typer.Option(None, "--max-length", help="tokens per scored sequence (default: the run's data.max_length)")
DATA = typer.Option(None, "--data", help="your records for the accuracy, loss or preference suite")
OUTPUT = typer.Option(None, "--output", "-o", help="folder for eval.json + generations.jsonl")
MC = typer.Option("generate", "--mc", help="multiple choice by 'generate' (read the letter) or 'loglik'")
LM_EVAL_INCLUDE = typer.Option(None, "--lm-eval-include", help="a folder of lm-eval task YAML files for the "
                               "lm-eval:TASK suites (repeatable)")
LM_EVAL_FEWSHOT = typer.Option(None, "--lm-eval-fewshot", help="few-shot examples per lm-eval task (default: the "
                               "task's own)")
DTYPE = typer.Option("auto", "--dtype", help=DTYPE_HELP)
LM_EVAL_CHAT = typer.Option(False, "--lm-eval-chat-template", help="lm-eval prompts through the model's chat "
                            "template (the run's own)")


def _harness(include: list[Path] | None, fewshot: int | None, chat_template: bool) -> dict:
    """The lm-eval suites' settings (EvalSettings.lm_eval_*)."""
    if fewshot is not None and fewshot < 0:
        raise TunesmithError(f"--lm-eval-fewshot {fewshot} is negative; give 0 or more examples")
    return {"lm_eval_include": tuple(str(p) for p in include or ()), "lm_eval_fewshot": fewshot,
            "lm_eval_chat_template": chat_template}


def _settings(max_new_tokens: int, batch_size: int, limit: int | None, temperature: float, top_p: float, seed: int,
              max_length: int | None, mc: str, **extra):
    from tunesmith.evaluate.runner import EvalSettings

    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1) or temperature < 0 \
            or not 0 < top_p <= 1 or (max_length is not None and max_length < 8):
        raise TunesmithError("settings out of range: use --max-new-tokens ≥ 1, --batch-size ≥ 1, --limit ≥ 1, "
                             "--temperature ≥ 0, 0 < --top-p ≤ 1 and --max-length ≥ 8")
    if mc not in ("generate", "loglik"):
        raise TunesmithError(f"--mc {mc!r} is not a multiple-choice mode; use generate or loglik")
    from tunesmith.cli.package import check_dtype

    check_dtype(extra.get("dtype", "auto"))
    return EvalSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, temperature=temperature,
                        top_p=top_p, seed=seed, max_length=max_length, mc=mc, progress=console.is_tty(), **extra)


@app.command("eval", help="Evaluate models on suites; writes eval.json and generations.jsonl (and RUN/eval/summary.json).")
def eval_(
    models: list[str] = typer.Argument(..., help=_MODELS),
    suite: list[str] = typer.Option(..., "--suite", "-s", help=_SUITE),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a PEFT adapter folder to put on the one MODEL "
                                           "(a base)"),
    data: Optional[Path] = DATA,
    output: Optional[Path] = OUTPUT,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    limit: Optional[int] = LIMIT,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    max_length: Optional[int] = MAX_LENGTH,
    mc: str = MC,
    method: str = typer.Option("exact_match", "--method", help="scoring of accuracy records that name none: "
                               "exact_match, contains, regex, numeric, multiple_choice"),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="a reward-model run that also labels "
                                              "refusals (score above --classifier-threshold = refusal)"),
    classifier_threshold: float = typer.Option(0.0, "--classifier-threshold", help="refusal score threshold"),
    lm_eval_include: Optional[list[Path]] = LM_EVAL_INCLUDE,
    lm_eval_fewshot: Optional[int] = LM_EVAL_FEWSHOT,
    lm_eval_chat_template: bool = LM_EVAL_CHAT,
    dtype: str = DTYPE,
) -> None:
    from tunesmith.evaluate.compare import metrics_table
    from tunesmith.evaluate.runner import run_eval
    from tunesmith.evaluate.scoring import SCORERS

    if adapter is not None and len(models) != 1:
        raise TunesmithError(f"--adapter goes on one base model, got {len(models)} models; give adapter folders as "
                             f"models instead")
    if method not in SCORERS:
        raise TunesmithError(f"--method {method!r} is not a scoring method; use one of {', '.join(SCORERS)}")
    settings = _settings(max_new_tokens, batch_size, limit, temperature, top_p, seed, max_length, mc, method=method,
                         classifier=str(classifier) if classifier else None, classifier_threshold=classifier_threshold,
                         dtype=dtype, **_harness(lm_eval_include, lm_eval_fewshot, lm_eval_chat_template))
    specs = [(models[0], str(adapter))] if adapter is not None else models
    result, out = run_eval(specs, suite, settings, data, output)
    console.out.print(metrics_table(result))
    console.info(f"wrote {out / 'eval.json'} and {out / 'generations.jsonl'}")


@app.command(help="Compare models on the same prompts: side-by-side outputs, metrics, and per-item regressions "
                  "against the first model.")
def compare(
    models: list[str] = typer.Argument(..., help=_MODELS + "; the first is the baseline"),
    prompts: list[str] = typer.Option(..., "--prompts", "-p", help=_SUITE),
    data: Optional[Path] = DATA,
    output: Optional[Path] = OUTPUT,
    html: Optional[Path] = typer.Option(None, "--html", help="also write the HTML report here"),
    md: Optional[Path] = typer.Option(None, "--md", help="also write the Markdown summary here"),
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = BATCH_SIZE,
    limit: Optional[int] = LIMIT,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    max_length: Optional[int] = MAX_LENGTH,
    mc: str = MC,
    lm_eval_include: Optional[list[Path]] = LM_EVAL_INCLUDE,
    lm_eval_fewshot: Optional[int] = LM_EVAL_FEWSHOT,
    lm_eval_chat_template: bool = LM_EVAL_CHAT,
    dtype: str = DTYPE,
) -> None:
    from tunesmith.evaluate.compare import comparison_tables, compare_models
    from tunesmith.evaluate.report import build_report
    from tunesmith.evaluate.runner import write_results

    settings = _settings(max_new_tokens, batch_size, limit, temperature, top_p, seed, max_length, mc, dtype=dtype,
                         **_harness(lm_eval_include, lm_eval_fewshot, lm_eval_chat_template))
    result = compare_models(models, prompts, max_new_tokens, batch_size, limit, settings=settings, data=data)
    out = write_results(result, output or Path("evals") / datetime.now().strftime("compare-%Y%m%d-%H%M%S"))
    for table in comparison_tables(result):
        console.out.print(table)
    if html or md:
        build_report([], result, html or out / "report.html", md)
    console.info(f"wrote {out / 'eval.json'}" + (f", {html}" if html else "") + (f", {md}" if md else ""))


@app.command(help="Write a self-contained HTML report (curves, config, evaluations, generations) and a Markdown "
                  "summary.")
def report(
    runs: Optional[list[Path]] = typer.Argument(None, help="run folders (output_dir of `tunesmith train`)"),
    comparison: Optional[Path] = typer.Option(None, "--comparison", "-c", help="an eval.json (or its folder) from "
                                              "`tunesmith eval` or `compare` to include"),
    html: Optional[Path] = typer.Option(None, "--html", help="HTML output (default RUN/report.html for one run, "
                                        "else reports/<timestamp>.html)"),
    md: Optional[Path] = typer.Option(None, "--md", help="also write the Markdown summary here"),
) -> None:
    from tunesmith.evaluate.report import build_report, load_comparison

    runs = runs or []
    result = load_comparison(comparison) if comparison else None
    if html is None:
        html = runs[0] / "report.html" if len(runs) == 1 else Path("reports") / datetime.now().strftime(
            "%Y%m%d-%H%M%S.html")
    summary = build_report(runs, result, html, md)
    console.out.print(summary, markup=False)
    console.info(f"wrote {html}" + (f" and {md}" if md else ""))
