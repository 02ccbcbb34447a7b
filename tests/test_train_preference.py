"""The DPO family end to end on tiny in-process models (losses: test_preference_losses.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_train_sft import make_cfg, metrics, write_sft_data
from tiny import save_tiny_model
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.recipe import run

WORDS = ["sea", "sky", "wind", "Paris", "France", "poem", "tool", "call", "add", "print"]


def write_pairs(path: Path, n: int = 32, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 4)))
            f.write(json.dumps({"prompt": f"Repeat: {w}", "chosen": f"{w} done.",
                                "rejected": "I will not repeat that, sorry."}) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-pref"), layers=2, hidden=32)


def pref_cfg(tmp_path: Path, model_dir: Path, method: str, **pref):
    data = write_pairs(tmp_path / "pairs.jsonl")
    raw = {"model": str(model_dir), "method": method,
           "data": {"train": str(data), "eval": str(data), "max_length": 256},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "preference": {"beta": 0.1, **pref},
           "train": {"max_steps": 24, "batch_size": 8, "learning_rate": 2e-2, "eval_steps": 12, "save_steps": 0,
                     "dtype": "fp32", "threads": 1},
           "output_dir": str(tmp_path / "run")}
    return load_config(None, raw=raw)


@pytest.mark.parametrize("method,pref", [("dpo", {}), ("dpo", {"loss_type": "ipo"}),
                                         ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}),
                                         ("dpo", {"loss_type": "hinge"}), ("simpo", {}), ("orpo", {})])
def test_preference_accuracy_rises_on_training_pairs(tmp_path, model_dir, method, pref):
    cfg = pref_cfg(tmp_path, model_dir, method, **pref)
    run(cfg)
    ev = [m for m in metrics(Path(cfg.output_dir)) if "eval_rewards/accuracies" in m]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 24
    assert ev[-1]["eval_rewards/accuracies"] > 0.9, ev
    if method == "dpo":  # policy == reference before training: every implicit reward is 0
        assert ev[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert ev[-1]["eval_rewards/margins"] > ev[0]["eval_rewards/margins"]
    logged = metrics(Path(cfg.output_dir))[-2]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged)
    # only the adapter trained: every saved tensor is a LoRA factor, and every B factor moved from 0
    adapter = load_file(Path(cfg.output_dir) / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_dpo_full_finetuning_uses_a_frozen_reference(tmp_path, model_dir):
    cfg = pref_cfg(tmp_path, model_dir, "dpo")
    cfg = load_config(None, raw={**cfg.to_dict(), "full": True, "lora": None,
                                 "train": {**cfg.train.model_dump(), "learning_rate": 1e-3, "max_steps": 12}})
    run(cfg)
    ev = [m for m in metrics(Path(cfg.output_dir)) if "eval_rewards/accuracies" in m]
    assert ev[-1]["eval_rewards/accuracies"] > 0.9


def test_dpo_from_an_sft_adapter(tmp_path, model_dir):
    (tmp_path / "sft").mkdir()
    sft = make_cfg(tmp_path / "sft", model_dir, train__max_steps=4)
    run(sft)
    cfg = pref_cfg(tmp_path, model_dir, "dpo")
    cfg = load_config(None, raw={**cfg.to_dict(), "init_from": str(Path(sft.output_dir) / "final")})
    run(cfg)
    adapter = load_file(Path(cfg.output_dir) / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_preference_method_refuses_sft_data(tmp_path, model_dir):
    cfg = pref_cfg(tmp_path, model_dir, "dpo")
    sft_file = write_sft_data(tmp_path / "sft.jsonl")
    cfg = load_config(None, raw={**cfg.to_dict(), "data": {"train": str(sft_file), "max_length": 256}})
    with pytest.raises(TunesmithError, match="preference"):
        run(cfg)
