"""DDP on 2 CPU processes (gloo) through the real `accelerate launch` follows one process
with the same global batch: only the reduction order differs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_sft import train_losses, write_sft_data
from tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    save_tiny_model(tmp_path / "model", head_scale=1.0)
    write_sft_data(tmp_path / "train.jsonl")
    base = ("model: model\ndata: {train: train.jsonl, max_length: 256, group_by_length: false}\n"
            "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
            "train: {max_steps: 5, batch_size: 4, learning_rate: 1.0e-2, dtype: fp32, save_steps: 0, threads: 1}\n")
    (tmp_path / "cfg.yaml").write_text(base)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    ddp = subprocess.run(
        [accelerate, "launch", "--config_file", str(ROOT / "examples/accelerate/multi_cpu.yaml"),
         "--main_process_port", "29533", "-m", "tunesmith", "train", "cfg.yaml", "--set", "output_dir=ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "processes 2" in ddp.stderr
    single = subprocess.run(
        [sys.executable, "-m", "tunesmith", "train", "cfg.yaml", "--set", "output_dir=single",
         "--set", "train.grad_accum=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert list(a) == list(range(1, 6)) and a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["hardware"]["processes"] == 2
