"""Pipelines on a tiny model: stages, lineage, skip / resume / re-run downstream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from test_train_preference import write_pairs
from test_train_sft import write_sft_data
from tiny import save_tiny_model
from tunesmith.errors import TunesmithError
from tunesmith.pipeline import LINEAGE, Pipeline, load_pipeline

TRAIN = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 2, "eval_steps": 0,
         "dtype": "fp32", "threads": 1}


def write_pipeline(tmp_path: Path, dpo_lr: float = 1e-2) -> Path:
    model = save_tiny_model(tmp_path / "tiny", layers=2, hidden=32)
    write_sft_data(tmp_path / "sft.jsonl")
    write_pairs(tmp_path / "pairs.jsonl")
    raw = {"name": "t", "output_dir": "out", "model": str(model), "stages": [
        {"name": "data", "check": ["sft.jsonl", "pairs.jsonl"]},
        {"name": "sft", "train": {"method": "sft", "data": {"train": "sft.jsonl", "max_length": 128},
                                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TRAIN}},
        {"name": "dpo", "train": {"method": "dpo", "init_from": "sft",
                                  "data": {"train": "pairs.jsonl", "max_length": 128},
                                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                  "train": {**TRAIN, "learning_rate": dpo_lr}}},
        {"name": "export", "export": {"from": "dpo", "format": "merged"}},
    ]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def lineage(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / LINEAGE).read_text())["stages"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pipeline paths are relative to the working directory


def test_pipeline_runs_skips_and_reruns_what_changed(tmp_path, capsys):
    path = write_pipeline(tmp_path)
    Pipeline(load_pipeline(path)).run()
    first = lineage(tmp_path)
    assert list(first) == ["data", "sft", "dpo", "export"]
    out = tmp_path / "out"
    assert (out / "sft" / "final").is_dir() and (out / "dpo" / "final").is_dir()
    assert (out / "export" / "tunesmith.json").exists()
    # the DPO run records where it started: the SFT stage's final weights
    assert json.loads((out / "dpo" / "run.json").read_text())["init_from"] == str((out / "sft" / "final").resolve())
    assert first["dpo"]["inputs"]["upstream"] == {"sft": first["sft"]["output"]}

    capsys.readouterr()
    Pipeline(load_pipeline(path)).run()  # nothing changed: every stage is skipped
    err = capsys.readouterr().err
    assert err.count("unchanged, skipped") == 4 and lineage(tmp_path) == first

    write_pipeline(tmp_path, dpo_lr=5e-3)  # change DPO only: SFT stays, DPO and export run again
    Pipeline(load_pipeline(path)).run()
    second = lineage(tmp_path)
    assert second["sft"] == first["sft"]
    assert second["dpo"]["key"] != first["dpo"]["key"] and second["dpo"]["output"] != first["dpo"]["output"]
    assert second["export"]["key"] != first["export"]["key"]
    assert (out / "dpo.previous" / "final").is_dir()  # the earlier result is kept beside


def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    path = write_pipeline(tmp_path)
    Pipeline(load_pipeline(path)).run()
    dpo = tmp_path / "out" / "dpo"
    weights = (dpo / "final" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(dpo / "final")  # as if the process died after its last checkpoint
    (dpo / "run.json").unlink()
    capsys.readouterr()
    Pipeline(load_pipeline(path)).run()
    assert "dpo: resuming" in capsys.readouterr().err
    assert (dpo / "final" / "adapter_model.safetensors").read_bytes() == weights


def test_pipeline_errors_name_the_stage(tmp_path):
    path = write_pipeline(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["stages"][2]["train"]["init_from"] = "sfft"
    with pytest.raises(TunesmithError, match="init_from"):
        Pipeline(load_pipeline(None, raw=raw, base_dir=tmp_path)).run()
    raw["stages"][2]["train"]["init_from"] = "sft"
    raw["stages"][3]["export"]["from"] = "nope"
    with pytest.raises(TunesmithError, match="`nope` is not a train stage"):
        Pipeline(load_pipeline(None, raw=raw, base_dir=tmp_path)).run()
    raw["stages"][1]["train"]["train"]["learnig_rate"] = 1
    with pytest.raises(TunesmithError, match="did you mean `learning_rate`"):
        Pipeline(load_pipeline(None, raw=raw, base_dir=tmp_path)).run()
    assert not (tmp_path / "out").exists()  # validation happens before any stage runs
