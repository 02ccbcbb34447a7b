"""``tunesmith quickstart``: the bundled pipeline, its "house format" suite and the
"Before → after" section of its report.

The quickstart's pipeline file is ``pipeline.yaml`` beside this module (``{data}`` stands
for the bundled data folder); ``tunesmith quickstart --config`` prints it runnable, and
``tunesmith run`` on that file registers the suite and adds the section through
``sections_for`` — nothing is registered for pipelines that do not use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunesmith import console
from tunesmith.pipeline import Pipeline, PipelineSpec, Section, finish, load_pipeline
from tunesmith.quickstart.data import CONCISE_MAX_WORDS, DATA_DIR, answer_of, concise_ok, format_ok

BUNDLED = Path(__file__).with_name("pipeline.yaml")
EVAL_FILE = "eval_prompts.jsonl"

# The gains the quickstart must show (issue: "change the task or the training, not the thresholds").
SFT_GAIN_POINTS = 40.0      # format rate: SFT (LoRA) over base
DPO_MAX_DROP_POINTS = 5.0   # format rate: DPO may not fall more than this below SFT


def bundled_text() -> str:
    """The bundled pipeline with the data folder filled in: runnable as it is printed."""
    return BUNDLED.read_text(encoding="utf-8").replace("{data}", str(DATA_DIR))


def quickstart_spec(output_dir: str | None = None, model: str | None = None, scale: float = 1.0) -> PipelineSpec:
    """The bundled pipeline; ``scale`` < 1 shortens every train stage and the eval set
    proportionally (a smoke run: the figures need the full scale)."""
    raw = yaml.safe_load(bundled_text())
    if output_dir:
        raw["output_dir"] = output_dir
    if model:
        raw["model"] = model
    if scale < 1.0:
        for stage in raw["stages"]:
            t = (stage.get("train") or {}).get("train")
            if t:
                t["max_steps"] = max(2, round(t["max_steps"] * scale))
                for k in ("save_steps", "eval_steps"):
                    if t.get(k):
                        t[k] = max(1, round(t[k] * scale))
            if "compare" in stage:
                stage["compare"]["limit"] = max(4, round(48 * scale))
                stage["compare"]["max_new_tokens"] = max(16, round(stage["compare"]["max_new_tokens"] * scale))
    return load_pipeline(None, raw=raw, base_dir=Path.cwd())


# ------------------------------------------------------------- the house-format suite

SUITE = "house_format"


def score_house(records: list[dict], responses: list[str]) -> dict:
    """Per item: the house format (the suite's verdict), a concise WHY, the right answer
    (in the ANSWER line, or anywhere in a reply without one: knowledge, not format);
    aggregate: the three rates with Wilson 95% intervals."""
    from tunesmith.evaluate.scoring import normalize_answer
    from tunesmith.evaluate.stats import rate_summary

    items = []
    for rec, out in zip(records, responses, strict=True):
        # Knowledge, whatever the format: the ANSWER line when there is one, else the whole reply.
        answer = answer_of(out) or out
        items.append({"id": rec["id"], "passed": format_ok(out), "concise": concise_ok(out),
                      "correct": normalize_answer(rec["reference"]) in normalize_answer(answer)})
    return {"items": items, "aggregate": {
        "n": len(items), "format_rate": rate_summary([i["passed"] for i in items]),
        "concise_rate": rate_summary([i["concise"] for i in items]),
        "answer_accuracy": rate_summary([i["correct"] for i in items])}}


def register_suite() -> None:
    """Add the house-format suite to the evaluation registry (idempotent)."""
    from tunesmith.evaluate.runner import SuiteSpec
    from tunesmith.evaluate.runner import register_suite as register
    from tunesmith.evaluate.scoring import load_suite

    register(SuiteSpec(
        SUITE, f"the quickstart's 48 held-out questions: the house format (ANSWER/WHY), a WHY of at most "
               f"{CONCISE_MAX_WORDS} words, and the right answer", lambda inp: load_suite(str(DATA_DIR / EVAL_FILE)),
        "format_rate", score=score_house))


def _pct(rate: dict) -> str:
    return f"{100 * rate['rate']:.1f}% [{100 * rate['low']:.0f}–{100 * rate['high']:.0f}]"


# ------------------------------------------------------------------- before → after


def before_after(pipeline: Pipeline) -> tuple[list[dict], list[str]]:
    """Rows of the closing table (trainable parameters, measured peak memory of training,
    the three metrics per model) and the PASS/FAIL lines of the quickstart's gains."""
    comparison = next((v for v in pipeline.results.values() if isinstance(v, dict) and SUITE in v.get("results", {})),
                      None)
    rows = []
    by_label = (comparison or {}).get("results", {}).get(SUITE, {})
    order = [m["label"] for m in (comparison or {}).get("models", [])]
    for label in sorted(by_label, key=lambda x: order.index(x) if x in order else len(order)):
        metrics = by_label[label]["aggregate"]
        run = pipeline.stage_dir(label) / "run.json"
        m = json.loads(run.read_text()) if run.exists() else {}
        rows.append({"model": label, "method": m.get("method", "—"),
                     "training": "—" if not m else ("LoRA" if m.get("adapter") else "full fine-tuning"),
                     "trainable": m.get("trainable_parameters"), "total": m.get("total_parameters"),
                     "peak_memory_gib": round(m["peak_memory_bytes"] / 2**30, 2) if m.get("peak_memory_bytes") else None,
                     "peak_memory_kind": m.get("peak_memory_kind"),
                     "step_memory_gib": round(m["step_memory_bytes"] / 2**30, 2) if m.get("step_memory_bytes") else None,
                     "seconds": round(m["end_time"] - m["start_time"])
                     if m else None, **{k: metrics[k] for k in ("format_rate", "concise_rate", "answer_accuracy")}})
    by = {r["model"]: r for r in rows}
    checks = []
    if {"base", "sft"} <= by.keys():
        gain = 100 * (by["sft"]["format_rate"]["rate"] - by["base"]["format_rate"]["rate"])
        checks.append(("SFT format rate over base", gain >= SFT_GAIN_POINTS, f"+{gain:.1f} points (need ≥ {SFT_GAIN_POINTS:.0f})"))
    if {"sft", "dpo"} <= by.keys():
        d_concise = 100 * (by["dpo"]["concise_rate"]["rate"] - by["sft"]["concise_rate"]["rate"])
        d_format = 100 * (by["dpo"]["format_rate"]["rate"] - by["sft"]["format_rate"]["rate"])
        checks.append(("DPO concise rate over SFT", d_concise > 0, f"{d_concise:+.1f} points (need > 0)"))
        checks.append(("DPO keeps the SFT format", d_format >= -DPO_MAX_DROP_POINTS,
                       f"{d_format:+.1f} points (may fall ≤ {DPO_MAX_DROP_POINTS:.0f})"))
    return rows, [f"{'PASS' if ok else 'FAIL'}  {what}: {detail}" for what, ok, detail in checks]


def _count(n) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}M"


def _memory(r: dict) -> str:
    if r["peak_memory_gib"] is None:
        return "—"
    added = f" (+{r['step_memory_gib']} over the loaded model)" if r.get("step_memory_gib") is not None else ""
    return f"{r['peak_memory_gib']} GiB{added}"


def before_after_html(rows: list[dict], checks: list[str]) -> str:
    from html import escape

    head = ("<tr><th>model</th><th>training</th><th>trainable / total parameters</th><th>peak memory of "
            "training</th><th>time</th><th>format rate</th><th>concise rate (WHY ≤ "
            f"{CONCISE_MAX_WORDS} words)</th><th>answer accuracy</th></tr>")
    body = "".join(
        f"<tr><td>{escape(r['model'])}</td><td>{escape(r['training'])}</td>"
        f"<td>{_count(r['trainable'])} / {_count(r['total'])}</td><td>{_memory(r)}</td>"
        f"<td>{'—' if r['seconds'] is None else str(r['seconds']) + ' s'}</td>"
        f"<td>{_pct(r['format_rate'])}</td><td>{_pct(r['concise_rate'])}</td><td>{_pct(r['answer_accuracy'])}</td></tr>"
        for r in rows)
    checks_html = "".join(f"<li>{escape(c)}</li>" for c in checks)
    return (f"<table class='before-after'>{head}{body}</table><ul class='checks'>{checks_html}</ul>"
            "<p>Peak memory is measured during the training steps (peak RSS on CPU, allocator peak on CUDA), "
            "not estimated; in brackets what the steps added over the loaded model and libraries "
            "(gradients, optimizer state, activations).</p>")


def before_after_md(rows: list[dict], checks: list[str]) -> str:
    lines = ["| model | training | trainable / total | peak memory | format | concise | accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['training']} | {_count(r['trainable'])} / {_count(r['total'])} | {_memory(r)} | "
                     f"{_pct(r['format_rate'])} | {_pct(r['concise_rate'])} | {_pct(r['answer_accuracy'])} |")
    return "\n".join(lines + [""] + [f"- {c}" for c in checks])


# ------------------------------------------------------------------------ the endings


def report_sections(pipeline: Pipeline) -> list[Section]:
    """The "Before → after" section (and its PASS/FAIL lines on the console), when the
    pipeline compared models on the house-format suite."""
    rows, checks = before_after(pipeline)
    if not rows:
        return []
    for c in checks:
        console.info(c)
    return [("Before → after", before_after_html(rows, checks), before_after_md(rows, checks))]


def sections_for(spec: PipelineSpec):
    """For ``tunesmith run``: the quickstart's report sections when ``spec`` compares on
    its suite (which is then registered), else None."""
    if not any(stage.compare is not None and SUITE in stage.compare.suites for stage in spec.stages):
        return None
    register_suite()
    return report_sections


def run_quickstart(output_dir: str | None = None, model: str | None = None, scale: float = 1.0) -> Pipeline:
    register_suite()  # the registry may have been reset since an earlier run (tests do)
    return finish(quickstart_spec(output_dir, model, scale), report_sections)
