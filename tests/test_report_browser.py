"""The HTML report in a real browser (headless Chromium): it loads with no script error,
shows its tables, plots and generations, and its filters work. Skipped only when no
Chromium is installed (scripts/test.sh installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_export import train_tiny
from tiny import save_tiny_model
from tunesmith.evaluate.compare import compare_models
from tunesmith.evaluate.report import build_report
from tunesmith.evaluate.runner import SUITES, SuiteSpec, register_suite
from tunesmith.evaluate.stats import rate_summary

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPTS = [{"id": f"q{i}", "prompt": f"Repeat: {w}"} for i, w in enumerate(["sea", "sky", "wind", "poem"])]


def graded_scorer():
    """A scorer that grades the baseline (its first call) as passing q0, q1 and the other
    model q1, q2: one regression (q0) and one improvement (q2), whatever tiny models say."""
    calls = []

    def score(records, responses):
        passing = ({"q0", "q1"}, {"q1", "q2"})[min(len(calls), 1)]
        calls.append(1)
        items = [{"id": r["id"], "passed": r["id"] in passing} for r in records]
        return {"items": items, "aggregate": {"n": len(items), "accuracy": rate_summary([i["passed"] for i in items])}}

    return score


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    base = save_tiny_model(root / "base")
    run = train_tiny(root, base, "sft", data__eval_split=0.25, train__eval_steps=3)
    register_suite(SuiteSpec("graded", "fixed verdicts", lambda inp: PROMPTS, "accuracy", score=graded_scorer()))
    try:
        result = compare_models([str(base), str(run)], ["graded", "refusal_benign"], max_new_tokens=6, limit=4)
    finally:
        SUITES.pop("graded")
    assert result["diffs"]["graded"][str(run)]["regressed"] == ["q0"]
    out = root / "report.html"
    build_report([run], result, out, extra_sections=[("Before → after", "<p>format 0% → 100%</p>")])
    return out


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_without_script_errors(report, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and 'data-errors=""' in body, body
    assert "data-errors" not in re.search(r"<html[^>]*>", dom).group(0)  # nothing failed before <body>
    for table in ('id="regressions"', 'id="changes"', 'id="metrics"', 'id="generations"', 'class="kv"'):
        assert table in dom, table
    assert len(re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,', dom)) == 1  # an SFT run: loss + lr
    assert len(re.findall(r'<tr class="gen"', dom)) == 8  # 4 graded + 4 refusal_benign prompts
    assert "Before → after" in dom and "Refusal rules" in dom
    assert "8 of 8 prompts shown" in dom


def test_filters_show_only_the_regressed_rows(report, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", report.as_uri() + "#filter=regressed")
    rows = re.findall(r'<tr class="gen"[^>]*>', dom)
    shown = [r for r in rows if "display: none" not in r]
    assert len(shown) == 1 and 'data-suite="graded"' in shown[0] and "regressed" in shown[0]
    assert 'data-shown="1"' in re.search(r"<body[^>]*>", dom).group(0)
    dom = chromium(tmp_path, "--dump-dom", report.as_uri() + "#filter=improved&suite=graded")
    shown = [r for r in re.findall(r'<tr class="gen"[^>]*>', dom) if "display: none" not in r]
    assert len(shown) == 1 and "improved" in shown[0]


def test_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
