"""The report: one self-contained HTML file, and a short Markdown summary.

    build_report([Path("runs/sft-demo")], comparison, Path("report.html"), Path("report.md"))

The HTML needs no network and no server: plots are base64 PNG (``plots``), styles and the
filter script are inline (no CDN). Sections, in reading order:

1. ``extra_sections`` from the caller (a pipeline's "Before → after"), as given (HTML);
2. the comparison, when given (``compare.compare_models`` or any ``evaluate_models`` result):
   regressions first, then per-item change counts with McNemar p-values, the metric per
   model with its interval, and the generations side by side, filterable by
   regressed / improved / changed, by suite and by text (``#filter=regressed&suite=S`` in
   the URL opens it filtered);
3. per run: manifest (run.json), config (config.yaml), loss and learning-rate curves (train
   and eval), preference metrics for alignment runs, and the run's own evaluation table
   (``RUN/eval/eval.json``, written by ``tunesmith eval RUN``);
4. the refusal-phrase rules, whenever a refusal suite was scored, so a reader can judge
   every "refused".

The page script ends with ``document.body.dataset.ready = "1"``, and a ``window.onerror``
handler appends any error to ``data-errors``: a headless browser can prove the page ran.
Unfinished runs (metrics but no run.json yet) are shown too, so a report can watch a run.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.compare import item_diffs, metric_rows
from tunesmith.evaluate.plots import read_metrics, run_plots
from tunesmith.files import write_text_atomic

TEMPLATES = Path(__file__).parent / "templates"
_TIME_KEYS = ("start_time", "end_time")


# --- runs ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def manifest_rows(manifest: dict) -> list[tuple[str, str]]:
    """run.json as (key, value) rows, nested sections one level deep (``final_metrics.loss``)."""
    rows = []
    for key, value in manifest.items():
        if key in _TIME_KEYS and isinstance(value, (int, float)):
            rows.append((key, datetime.fromtimestamp(value).isoformat(timespec="seconds")))
        elif isinstance(value, dict) and value:
            rows += [(f"{key}.{k}", _fmt(v)) for k, v in value.items()]
        else:
            rows.append((key, _fmt(value)))
    return rows


def read_run_folder(run_dir: Path) -> dict:
    """What a report shows of a run folder; refused when it is not one."""
    run_dir = Path(run_dir)
    if not any((run_dir / f).is_file() for f in ("run.json", "metrics.jsonl", "config.yaml")):
        raise TunesmithError(f"{run_dir} is not a run folder (no run.json, metrics.jsonl or config.yaml); point at "
                             f"the output_dir of `tunesmith train`")
    manifest = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    ev = run_dir / "eval" / "eval.json"
    return {"name": run_dir.name, "path": str(run_dir), "finished": bool(manifest), "manifest": manifest,
            "manifest_rows": manifest_rows(manifest), "config": config, "metrics": read_metrics(run_dir),
            "eval": json.loads(ev.read_text()) if ev.is_file() else None}


def _losses(metrics: list[dict]) -> tuple[float | None, list[float]]:
    train = [r["loss"] for r in metrics if isinstance(r.get("loss"), (int, float))]
    return (train[-1] if train else None), [r["eval_loss"] for r in metrics if r.get("eval_loss") is not None]


# --- comparison -----------------------------------------------------------------------------


def _generation_rows(result: dict, diffs: dict) -> list[dict]:
    """One row per prompt of each generation suite: every model's output, its verdict, and
    its status against the baseline; ``flags`` drive the page's filters."""
    labels = [m["label"] for m in result["models"]]
    rows = []
    for suite, prompts in result["prompts"].items():
        outs = [result["outputs"][suite].get(label, []) for label in labels]
        items = [result["results"][suite][label]["items"] for label in labels]
        moved = {label: (set(d["improved"]), set(d["regressed"])) for label, d in diffs.get(suite, {}).items()}
        for i, p in enumerate(prompts):
            flags, cells = set(), []
            for j, label in enumerate(labels):
                up, down = moved.get(label, (set(), set()))
                status = "improved" if p["id"] in up else "regressed" if p["id"] in down else ""
                if j and outs[j][i] != outs[0][i]:
                    flags.add("changed")
                if status:
                    flags.add(status)
                cells.append({"text": outs[j][i], "passed": items[j][i].get("passed"), "status": status})
            rows.append({"suite": suite, "id": p["id"], "prompt": p["prompt"], "reference": p.get("reference"),
                         "flags": " ".join(sorted(flags)), "cells": cells})
    return rows


def _regressions(result: dict, diffs: dict) -> list[dict]:
    base = result["models"][0]["label"]
    out = []
    for suite, by_model in diffs.items():
        prompts = {p["id"]: p["prompt"] for p in result["prompts"].get(suite, [])}
        ids = [p["id"] for p in result["prompts"].get(suite, [])]
        texts = {label: dict(zip(ids, result["outputs"].get(suite, {}).get(label, []))) for label in by_model}
        base_text = dict(zip(ids, result["outputs"].get(suite, {}).get(base, [])))
        out += [{"suite": suite, "model": label, "id": item_id, "prompt": prompts.get(item_id, ""),
                 "baseline": base_text.get(item_id, ""), "output": texts[label].get(item_id, "")}
                for label, d in by_model.items() for item_id in d["regressed"]]
    return out


def comparison_view(result: dict) -> dict:
    """What the template shows of an ``evaluate_models`` / ``compare_models`` result."""
    diffs = result.get("diffs")
    if diffs is None:
        diffs = item_diffs(result) if len(result["models"]) > 1 else {}
    return {"labels": [m["label"] for m in result["models"]], "baseline": result["models"][0]["label"],
            "models": result["models"], "groups": result.get("groups", []), "settings": result.get("settings", {}),
            "metric_rows": metric_rows(result), "diffs": diffs, "regressions": _regressions(result, diffs),
            "generations": _generation_rows(result, diffs), "suites": list(result["prompts"]),
            "aggregates": {s: {label: r["aggregate"] for label, r in by.items()} for s, by in result["results"].items()}}


# --- Markdown -------------------------------------------------------------------------------


def _md_cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_metrics(result: dict) -> list[str]:
    labels = [m["label"] for m in result["models"]]
    rows = metric_rows(result)
    if not rows:
        return []
    lines = ["| suite | " + " | ".join(f"`{_md_cell(label)}`" for label in labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for r in rows:
        cells = [c["text"] + (f" ({c['delta']:+.3f})" if i and c["delta"] is not None else "")
                 for i, c in enumerate(r["cells"])]
        lines.append(f"| {r['suite']} ({r['metric']} {r['arrow']}, n={r['n']}) | " + " | ".join(cells) + " |")
    return lines


def markdown_changes(result: dict, diffs: dict, max_ids: int = 8) -> list[str]:
    base = result["models"][0]["label"]
    lines = []
    for suite, by_model in diffs.items():
        for label, d in by_model.items():
            reg = ", ".join(map(str, d["regressed"][:max_ids])) + (" …" if len(d["regressed"]) > max_ids else "")
            lines.append(f"- `{_md_cell(label)}` · {suite}: **{len(d['regressed'])} regressed**"
                         f"{f' ({reg})' if reg else ''}, {len(d['improved'])} improved of {d['n']}; "
                         f"McNemar p = {d['p_value']:.3g}")
    return [f"Per-item changes against `{_md_cell(base)}`:", "", *lines] if lines else []


def markdown_summary(runs: list[dict], comparison: dict | None, title: str = "tunesmith report") -> str:
    """A short summary for terminals and pull requests: metrics, regressions, runs."""
    parts = [f"# {title}", ""]
    if comparison is not None:
        view = comparison_view(comparison)
        parts += ["## Evaluation", "", *markdown_metrics(comparison), ""]
        parts += [*markdown_changes(comparison, view["diffs"]), ""]
    if runs:
        parts += ["## Runs", "", "| run | method | steps | train loss (last) | eval loss (first → last) |",
                  "|---|---|---|---|---|"]
        for r in runs:
            last, evals = _losses(r["metrics"])
            method = r["manifest"].get("method") or "?"
            steps = r["manifest"].get("steps") or max((m.get("step", 0) for m in r["metrics"]), default=0)
            ev = f"{evals[0]:.4f} → {evals[-1]:.4f}" if evals else "—"
            state = "" if r["finished"] else " (unfinished)"
            parts.append(f"| `{_md_cell(r['path'])}`{state} | {method} | {steps} | "
                         f"{f'{last:.4f}' if last is not None else '—'} | {ev} |")
        for r in runs:
            if r["eval"] is not None:
                parts += ["", f"### `{_md_cell(r['path'])}` evaluation", "", *markdown_metrics(r["eval"])]
    return "\n".join(parts).rstrip() + "\n"


# --- HTML -------------------------------------------------------------------------------------


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda x: "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
    return env


def render_html(runs: list[dict], comparison: dict | None, extra_sections=(), title: str = "tunesmith report") -> str:
    from markupsafe import Markup

    from tunesmith import __version__

    views = [{**r, "plots": run_plots(Path(r["path"])),
              "eval_view": comparison_view(r["eval"]) if r["eval"] is not None else None} for r in runs]
    results = [comparison] + [r["eval"] for r in runs]
    patterns = next((res["refusal_patterns"] for res in results if res and res.get("refusal_patterns")), [])
    return _environment().get_template("report.html.jinja").render(
        title=title, created=datetime.now().isoformat(timespec="seconds"), version=__version__,
        extra_sections=[(t, Markup(html)) for t, html in extra_sections],
        comparison=comparison_view(comparison) if comparison is not None else None,
        runs=views, refusal_patterns=patterns)


def build_report(runs: list[Path], comparison: dict | None, out_html: Path, out_md: Path | None = None, *,
                 extra_sections: list[tuple[str, str]] = (), title: str = "tunesmith report") -> str:
    """Write the HTML report to ``out_html`` (and the Markdown summary to ``out_md``); return
    the Markdown. ``comparison``: a ``compare_models`` / ``evaluate_models`` result or None;
    ``extra_sections``: (title, HTML) pairs placed first, e.g. a pipeline's "Before → after"."""
    folders = [read_run_folder(Path(r)) for r in runs]
    if not folders and comparison is None:
        raise TunesmithError("nothing to report: give run folders, or a comparison (--comparison eval.json)")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    # Replaced in one rename: a crash or Ctrl-C mid-write leaves the previous report whole.
    write_text_atomic(out_html, render_html(folders, comparison, extra_sections, title))
    md = markdown_summary(folders, comparison, title)
    if out_md is not None:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_md, md)
    return md


def load_comparison(path: Path) -> dict:
    """A saved result: an eval.json, or the folder holding one (``tunesmith eval``/``compare`` -o)."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise TunesmithError(f"{path} holds no eval.json; point at the output folder of `tunesmith eval` or `compare`")
    return json.loads(file.read_text())
