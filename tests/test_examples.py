"""Every example file starts with the command that runs it, parses and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_starts_with_its_command_and_builds(path, monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.pipeline import Pipeline, load_pipeline

    first = path.read_text().splitlines()[0]
    raw = yaml.safe_load(path.read_text())
    monkeypatch.chdir(ROOT)  # example paths are relative to the repository root
    if "stages" in raw:
        assert first.startswith("# .venv/bin/tunesmith run examples/" + path.name)
        Pipeline(load_pipeline(path)).validate()  # every stage resolves: configs, stage names
    else:
        assert first.startswith("# .venv/bin/tunesmith train examples/" + path.name) or first.startswith(
            "# tunesmith train examples/" + path.name)
        load_config(path)


def test_the_bundled_quickstart_pipeline_builds(tmp_path, monkeypatch):
    from tunesmith.pipeline import Pipeline
    from tunesmith.quickstart.run import bundled_text, quickstart_spec

    assert bundled_text().startswith("# tunesmith run quickstart.yaml")
    monkeypatch.chdir(tmp_path)
    Pipeline(quickstart_spec()).validate()
