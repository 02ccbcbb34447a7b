"""Training curves from a run's metrics.jsonl, as base64 PNG for a self-contained report.

Figures are built with matplotlib's object API on the Agg canvas (``Figure`` +
``FigureCanvasAgg``), never through ``pyplot``: no global state, no GUI backend, safe in
a test process that already imported pyplot for something else. A PNG of a 10 x 3.2 in
figure at 100 dpi is ~30-50 KB, so a report with a few runs stays a few hundred KB.

metrics.jsonl rows (written by ``train.engine``): train rows carry ``loss``,
``learning_rate``, ``grad_norm``; eval rows ``eval_loss``; preference runs add
``rewards/{chosen,rejected,margins,accuracies}`` (and ``eval_`` versions); reward-model
runs ``accuracy`` and ``margin``.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from tunesmith.files import read_jsonl

CHOSEN_REJECTED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "margin")
ACCURACY = ("rewards/accuracies", "accuracy")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; a torn last line (a kill during a write) is left out."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _panel(ax, rows: list[dict], keys: tuple[str, ...], title: str) -> bool:
    """Train (line) and eval (markers) series of each key; False when none has data."""
    drawn = False
    for key in keys:
        for prefix, style in (("", "-"), ("eval_", "o--")):
            x, y = _series(rows, prefix + key)
            if x:
                ax.plot(x, y, style, label=prefix + key, linewidth=1.2, markersize=4)
                drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def _figure(rows: list[dict], panels: list[tuple[tuple[str, ...], str]]) -> str | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, len(panels))
    drawn = [_panel(ax, rows, keys, title) for ax, (keys, title) in zip(axes, panels)]
    return _png(fig) if any(drawn) else None


def run_plots(run_dir: Path) -> list[tuple[str, str]]:
    """(title, base64 PNG) for a run: loss + learning rate; and, for alignment runs, rewards
    + preference accuracy over steps. Empty when the run logged nothing yet."""
    rows = read_metrics(run_dir)
    plots = []
    curves = _figure(rows, [(("loss",), "loss (train: line, eval: markers)"), (("learning_rate",), "learning rate")])
    if curves:
        plots.append(("loss and learning rate", curves))
    if any(k in r or "eval_" + k in r for r in rows for k in CHOSEN_REJECTED):
        prefs = _figure(rows, [(CHOSEN_REJECTED, "rewards (chosen, rejected, margin)"),
                               (ACCURACY, "preference accuracy")])
        if prefs:
            plots.append(("preference metrics", prefs))
    return plots
