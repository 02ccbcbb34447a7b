"""Pipelines on a tiny model: stages, lineage, skip / resume / re-run downstream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_train_preference import write_pairs
from test_train_sft import write_sft_data
from tiny import save_tiny_model
from tunesmith.errors import TunesmithError
from tunesmith.files import folder_hash
from tunesmith.pipeline import LINEAGE, Pipeline, finish, load_pipeline

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
    finish(load_pipeline(path))  # what `tunesmith run` does: the stages, then the report
    first = lineage(tmp_path)
    assert list(first) == ["data", "sft", "dpo", "export"]
    out = tmp_path / "out"
    assert (out / "sft" / "final").is_dir() and (out / "dpo" / "final").is_dir()
    assert (out / "export" / "tunesmith.json").exists()
    # the DPO run records where it started: the SFT stage's final weights
    assert json.loads((out / "dpo" / "run.json").read_text())["init_from"] == str((out / "sft" / "final").resolve())
    assert first["dpo"]["inputs"]["upstream"] == {"sft": first["sft"]["output"]}

    assert all(entry["status"] == "done" for entry in first.values())
    # A reader holding the report while it is rewritten keeps the whole old file: the new one
    # arrives by rename (a crash or Ctrl-C mid-write cannot leave half a report).
    readers = {name: open(out / name, encoding="utf-8") for name in ("report.html", "report.md")}
    inodes = {name: os.stat(out / name).st_ino for name in readers}
    before = {name: (out / name).read_text(encoding="utf-8") for name in readers}

    capsys.readouterr()
    finish(load_pipeline(path))  # nothing changed: every stage is skipped
    err = capsys.readouterr().err
    assert err.count("unchanged, skipped") == 4 and lineage(tmp_path) == first
    for name, f in readers.items():
        old_text = f.read()
        f.close()
        assert os.stat(out / name).st_ino != inodes[name], name
        assert old_text == before[name] and old_text.strip(), name  # the reader kept the whole old report
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]

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


# ---------------------------------------------------------------- one writer, interruptions, refusals

SFT_ONLY = {"max_steps": 40, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 2, "eval_steps": 0,
            "dtype": "fp32", "threads": 1}


def write_sft_pipeline(tmp_path: Path, **stage) -> Path:
    """data check + one LoRA SFT stage (40 short steps, a checkpoint every 2)."""
    model = save_tiny_model(tmp_path / "tiny", layers=2, hidden=32)
    write_sft_data(tmp_path / "sft.jsonl")
    raw = {"name": "t", "output_dir": "out", "model": str(model), "stages": [
        {"name": "data", "check": ["sft.jsonl"]},
        {"name": "sft", "train": {"method": "sft", "data": {"train": "sft.jsonl", "max_length": 128},
                                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": SFT_ONLY}, **stage},
    ]}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_check_pipeline(tmp_path: Path) -> Path:
    write_sft_data(tmp_path / "sft.jsonl")
    write_pairs(tmp_path / "pairs.jsonl")
    path = tmp_path / "checks.yaml"
    path.write_text(yaml.safe_dump({"name": "checks", "output_dir": "out", "stages": [
        {"name": "data", "check": ["sft.jsonl"]}, {"name": "prefs", "check": ["pairs.jsonl"]}]}))
    return path


def processes_with(text: str) -> list[int]:
    """Live processes (not this one) whose command line contains ``text``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(d.name))
    return found


def test_a_second_run_on_the_same_folder_is_refused_and_writes_nothing(tmp_path):
    path = write_check_pipeline(tmp_path)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tunesmith.files import FolderLock; "
                               "FolderLock(sys.argv[1], 'pipeline folder').acquire(); print('locked', flush=True); "
                               "time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = (out / ".tunesmith.lock").read_text()
        with pytest.raises(TunesmithError, match=rf"pipeline folder .* is in use by pid {holder.pid}"):
            finish(load_pipeline(path))
        assert sorted(p.name for p in out.iterdir()) == [".tunesmith.lock"]  # no lineage, no stage, no report
        assert (out / ".tunesmith.lock").read_text() == lock  # the other writer keeps its lock
    finally:
        holder.kill()
        holder.wait()
    finish(load_pipeline(path))  # once it is gone (its lock stale), the pipeline runs
    assert set(lineage(tmp_path)) == {"data", "prefs"} and not (out / ".tunesmith.lock").exists()


def kill_trainer_after(out: Path, checkpoint: str, killed: list) -> threading.Thread:
    """SIGKILL the stage's trainer process once ``out/checkpoint`` exists (as a crash or an OOM kill would)."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if (out / checkpoint).is_dir():
                for pid in processes_with(str(out / "sft.yaml")):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_an_interrupted_first_run_resumes_instead_of_starting_over(tmp_path, capsys):
    """The trainer dies after its first checkpoints, before the stage ever finished: the
    re-run resumes from the newest checkpoint (nothing moved aside, nothing retrained)."""
    from tunesmith.train.checkpoint import latest_checkpoint

    path = write_sft_pipeline(tmp_path)
    out, killed = tmp_path / "out", []
    watcher = kill_trainer_after(out, "sft/checkpoint-2", killed)
    with pytest.raises(TunesmithError, match="stage sft failed"):
        Pipeline(load_pipeline(path)).run()
    watcher.join()
    assert killed, "the trainer finished before it could be killed"
    entry = lineage(tmp_path)["sft"]
    assert entry["status"] == "started" and [a["from_step"] for a in entry["attempts"]] == [0]
    kept = int(latest_checkpoint(out / "sft").name.split("-")[1])
    assert 2 <= kept < 40

    capsys.readouterr()
    Pipeline(load_pipeline(path)).run()
    err = capsys.readouterr().err
    assert f"stage sft: resuming from step {kept}" in err and "inputs changed" not in err
    assert not (out / "sft.previous").exists()
    entry = lineage(tmp_path)["sft"]
    assert entry["status"] == "done" and [a["from_step"] for a in entry["attempts"]] == [0, kept]
    steps = [json.loads(x)["step"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # one line per step: the resumed steps follow the kept ones
    assert entry["output"] == folder_hash(out / "sft" / "final")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".", "..", ".hidden", "sft.previous", "sft.yaml",
                                  "lineage.json", "report.html", "", "tab\tname"])
def test_stage_names_must_be_plain_folder_names(tmp_path, name):
    raw = {"output_dir": "out", "stages": [{"name": name, "check": ["x.jsonl"]}]}
    with pytest.raises(TunesmithError, match=r"stage name .* is not a plain folder name; use letters, digits"):
        load_pipeline(None, raw=raw, base_dir=tmp_path)
    raw["stages"][0]["name"] = "sft-2.v1_b"
    load_pipeline(None, raw=raw, base_dir=tmp_path)


@pytest.mark.parametrize("content,problem", [("{not json", "is not readable JSON"),
                                             (b"\xff\xfe", "is not readable JSON"),
                                             ("[]", "is not a pipeline lineage"),
                                             ('{"stages": []}', "is not a pipeline lineage"),
                                             ('{"stages": {"data": 3}}', "is not a pipeline lineage")])
def test_a_damaged_lineage_is_refused_in_one_sentence_and_kept(tmp_path, capsys, content, problem):
    from tunesmith.cli import main

    path = write_check_pipeline(tmp_path)
    target = tmp_path / "out" / LINEAGE
    target.parent.mkdir()
    (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
    before = target.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert problem in err and "lineage.json" in err and "delete it to re-run every stage" in err
    assert target.read_bytes() == before  # what was saved is left as it was


def test_a_check_only_pipeline_passes_and_exits_zero(tmp_path, capsys):
    from tunesmith.cli import main

    path = write_check_pipeline(tmp_path)
    main(["run", str(path)])  # returns: exit 0
    err = capsys.readouterr().err
    assert "every data check passed (data, prefs)" in err and "nothing to report" not in err
    assert set(lineage(tmp_path)) == {"data", "prefs"} and not (tmp_path / "out" / "report.html").exists()
