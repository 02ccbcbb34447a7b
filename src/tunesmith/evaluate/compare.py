"""Compare models on the same prompts: outputs side by side, each suite's metric per model,
and which items improved or regressed against the first model (the baseline).

    result = compare_models(["smollm2-135m-instruct", "runs/sft-demo"], "instruction_following",
                            max_new_tokens=64, batch_size=8, limit=12)
    for table in comparison_tables(result):
        console.out.print(table)

The result is ``runner.evaluate_models``'s (what eval.json holds) plus ``diffs``::

    {suite: {label: {"improved": [ids], "regressed": [ids], "both_passed": int, "both_failed": int,
                     "n": int, "p_value": float, "delta": metric(label) - metric(baseline) or None}}}

for every model but the baseline, on the items both have a verdict for (none for held-out
loss or unscored prompts). ``p_value`` is the exact McNemar test on the flipped items
(``stats.paired_diff``): on 12 prompts, 3 flips one way and none the other gives p = 0.25,
which is noise however it looks — so the regression list comes first and every delta
carries its p-value.

Models on the same base share one copy of it (``pool.ModelPool``): comparing a base with
three of its adapters loads the base once and switches adapters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from tunesmith.errors import TunesmithError
from tunesmith.infer import GENERATION_BATCH
from tunesmith.evaluate.harness import is_harness
from tunesmith.evaluate.runner import SUITES, EvalSettings, SuiteSpec, evaluate_models, headline, prompt_suite
from tunesmith.evaluate.stats import paired_diff


def _is_suite(x: Any) -> bool:
    if isinstance(x, SuiteSpec):
        return True
    name, _, file = str(x).partition("=")
    return (str(x) in SUITES or (bool(file) and name in SUITES) or is_harness(str(x))
            or Path(str(x)).is_file())


def as_suites(prompts_or_suite: Any) -> list:
    """A suite (name, file, "NAME=FILE" or ``SuiteSpec``) or a list of them → that list; a
    list of prompts (strings that name no suite, or message lists) → one unscored suite."""
    if isinstance(prompts_or_suite, (str, Path, SuiteSpec)):
        return [prompts_or_suite]
    items = list(prompts_or_suite)
    if items and all(_is_suite(x) for x in items):
        return items
    return [prompt_suite("prompts", items)]


def compare_models(specs: list[str], prompts_or_suite: Any, max_new_tokens: int = 256,
                   batch_size: int = GENERATION_BATCH, limit: int | None = None, *,
                   labels: list[str] | None = None, settings: EvalSettings | None = None,
                   data: str | Path | None = None) -> dict[str, Any]:
    """The same prompts through every model: per-model outputs, metrics and per-item diffs
    against ``specs[0]`` (module docstring). ``labels`` name the models (default: the specs);
    other generation settings come from ``settings``."""
    if len(specs) < 2:
        raise TunesmithError("compare needs at least two models; the first one is the baseline")
    settings = dataclasses.replace(settings or EvalSettings(), max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   limit=limit)
    result = evaluate_models(specs, as_suites(prompts_or_suite), settings, data, labels)
    result["diffs"] = item_diffs(result)
    return result


def item_diffs(result: dict) -> dict[str, dict[str, dict]]:
    """``diffs`` (module docstring) for a result of ``evaluate_models``."""
    labels = [m["label"] for m in result["models"]]
    base = labels[0]
    out: dict[str, dict[str, dict]] = {}
    for suite, by_model in result["results"].items():
        metric = result["suites"][suite]["metric"]
        base_items = by_model[base]["items"]
        for label in labels[1:]:
            items = by_model[label]["items"]
            both = [(a["id"], a["passed"], b["passed"]) for a, b in zip(base_items, items)
                    if a.get("passed") is not None and b.get("passed") is not None]
            if not both:
                continue
            d = paired_diff([a for _, a, _ in both], [b for _, _, b in both])
            d["improved"] = [both[i][0] for i in d["improved"]]
            d["regressed"] = [both[i][0] for i in d["regressed"]]
            hb, hl = headline(by_model[base]["aggregate"], metric), headline(by_model[label]["aggregate"], metric)
            d["delta"] = hl[0] - hb[0] if hb and hl else None
            out.setdefault(suite, {})[label] = d
    return out


# --- terminal tables ----------------------------------------------------------------------


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_metric(h: tuple[float, float | None, float | None] | None) -> str:
    if h is None:
        return "—"
    value, low, high = h
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else f"{value:.3f}"


def metric_rows(result: dict) -> list[dict]:
    """One row per scored suite: its metric, direction, and per model (value text, delta vs
    the baseline, whether that delta is an improvement). Shared by the terminal and HTML."""
    labels = [m["label"] for m in result["models"]]
    rows = []
    for suite, info in result["suites"].items():
        if info["metric"] is None:
            continue
        heads = [headline(result["results"][suite][label]["aggregate"], info["metric"]) for label in labels]
        cells = []
        for h in heads:
            delta = h[0] - heads[0][0] if h and heads[0] else None
            better = None if not delta else (delta > 0) == info["higher_is_better"]
            cells.append({"text": format_metric(h), "delta": delta, "better": better})
        rows.append({"suite": suite, "metric": info["metric"], "arrow": "↑" if info["higher_is_better"] else "↓",
                     "n": info["n"], "cells": cells})
    return rows


def metrics_table(result: dict) -> Table:
    labels = [m["label"] for m in result["models"]]
    table = Table(title="metric per model (95% interval)", title_justify="left")
    table.add_column("suite")
    for label in labels:
        table.add_column(label, overflow="fold")
    for row in metric_rows(result):
        cells = []
        for i, c in enumerate(row["cells"]):
            text = Text(c["text"])
            if i and c["delta"] is not None:
                text.append(f" {c['delta']:+.3f}", style="green" if c["better"] else "red" if c["better"] is False
                            else "dim")
            cells.append(text)
        table.add_row(f"{row['suite']} ({row['metric']} {row['arrow']}, n={row['n']})", *cells)
    return table


def _outputs(result: dict, suite: str, label: str) -> dict[str, str]:
    ids = [p["id"] for p in result["prompts"].get(suite, [])]
    return dict(zip(ids, result["outputs"].get(suite, {}).get(label, [])))


def regressions_table(result: dict, max_items: int = 10) -> Table | None:
    """Every item a model fails that the baseline passed, with both outputs (what to read first)."""
    base = result["models"][0]["label"]
    table = Table(title=f"regressions against {base}", title_justify="left", title_style="bold red")
    for col in ("suite", "model", "id", "prompt", base + " (passed)", "output (failed)"):
        table.add_column(col, overflow="fold")
    rows = 0
    for suite, by_model in result.get("diffs", {}).items():
        prompts = {p["id"]: p["prompt"] for p in result["prompts"].get(suite, [])}
        base_out = _outputs(result, suite, base)
        for label, d in by_model.items():
            out = _outputs(result, suite, label)
            for item_id in d["regressed"][:max_items]:
                table.add_row(suite, label, str(item_id), Text(_clip(prompts.get(item_id, ""), 60)),
                              Text(_clip(base_out.get(item_id, ""), 60)), Text(_clip(out.get(item_id, ""), 60)))
                rows += 1
            if len(d["regressed"]) > max_items:
                table.add_row(suite, label, f"… {len(d['regressed']) - max_items} more", "", "", "")
    return table if rows else None


def changes_table(result: dict) -> Table:
    base = result["models"][0]["label"]
    table = Table(title=f"per-item changes against {base}", title_justify="left")
    for col in ("suite", "model", "improved", "regressed", "both passed", "both failed", "McNemar p"):
        table.add_column(col)
    for suite, by_model in result.get("diffs", {}).items():
        for label, d in by_model.items():
            table.add_row(suite, label, Text(str(len(d["improved"])), style="green"),
                          Text(str(len(d["regressed"])), style="red"), str(d["both_passed"]), str(d["both_failed"]),
                          f"{d['p_value']:.3g}")
    return table


def outputs_table(result: dict, suite: str, max_items: int = 10) -> Table:
    """Outputs side by side, one row per prompt (unscored prompt suites)."""
    labels = [m["label"] for m in result["models"]]
    table = Table(title=f"{suite}: outputs side by side", title_justify="left")
    prompts = result["prompts"][suite]
    refs = any("reference" in p for p in prompts)  # SFT records as prompts: their answers beside the outputs
    table.add_column("prompt", overflow="fold")
    if refs:
        table.add_column("reference", overflow="fold")
    for label in labels:
        table.add_column(label, overflow="fold")
    outs = [result["outputs"][suite][label] for label in labels]
    for i, p in enumerate(prompts[:max_items]):
        ref = [Text(_clip(p.get("reference", ""), 60))] if refs else []
        table.add_row(Text(_clip(p["prompt"], 60)), *ref, *(Text(_clip(o[i], 80)) for o in outs))
    return table


def comparison_tables(result: dict, max_items: int = 10) -> list[Table]:
    """What ``tunesmith compare`` prints: regressions first, then the per-item change counts,
    the metrics, and the outputs of unscored prompt suites."""
    tables: list[Table] = []
    regressions = regressions_table(result, max_items)
    if regressions is not None:
        tables.append(regressions)
    if result.get("diffs"):
        tables.append(changes_table(result))
    if metric_rows(result):
        tables.append(metrics_table(result))
    tables += [outputs_table(result, s, max_items) for s, info in result["suites"].items()
               if info["metric"] is None and info["kind"] == "generation"]
    return tables
