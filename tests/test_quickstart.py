"""A shortened quickstart on a tiny model, end to end: every stage, every artifact, the
report rendered in headless Chromium (screenshot kept beside the report)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tiny import save_tiny_model
from tunesmith.quickstart.run import bundled_text, run_quickstart


def test_quickstart_config_prints_a_runnable_pipeline(capsys):
    from tunesmith.cli import main

    main(["quickstart", "--config"])
    out = capsys.readouterr().out
    assert out.strip() == bundled_text().strip() and "{data}" not in out
    assert "sft_train.jsonl" in out and "method: dpo" in out


def test_shortened_quickstart_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = save_tiny_model(tmp_path / "tiny", layers=2, hidden=32)
    pipeline = run_quickstart(output_dir=str(tmp_path / "qs"), model=str(model), scale=0.07)
    out = tmp_path / "qs"
    stages = json.loads((out / "lineage.json").read_text())["stages"]
    assert list(stages) == ["data", "sft", "sft_full", "dpo", "compare", "export"]
    for name in ("sft", "sft_full", "dpo"):
        run = json.loads((out / name / "run.json").read_text())
        assert (out / name / "final").is_dir() and run["peak_memory_bytes"] > 0
    assert json.loads((out / "sft_full" / "run.json").read_text())["adapter"] is False
    comparison = json.loads((out / "compare" / "comparison.json").read_text())
    assert [m["label"] for m in comparison["models"]] == ["base", "sft_full", "sft", "dpo"]
    assert set(comparison["results"]["house_format"]) == {"base", "sft_full", "sft", "dpo"}
    assert json.loads((out / "export" / "tunesmith.json").read_text())["format"] == "merged"
    md = (out / "report.md").read_text()
    assert "Before → after" in md and "format" in md
    err = capsys.readouterr().err
    assert re.search(r"(PASS|FAIL)  SFT format rate over base", err) and f"report: {out / 'report.html'}" in err
    assert pipeline.results["export"] == str(out / "export")

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", (out / "report.html").as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and 'data-errors=""' in body
    assert "Before → after" in dom and "before-after" in dom
    shot = out / "report.png"  # kept in the run folder beside the report
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2400",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
