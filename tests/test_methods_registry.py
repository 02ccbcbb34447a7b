"""Every row of the method registry builds on a tiny model and takes one real step:
prepare its data, build the policy, its reference and the method, roll out and collate a
micro-batch, and get a finite loss with a gradient on the trained parameters."""

from __future__ import annotations

import contextlib
import json
import typing
from pathlib import Path

import pytest
import torch

from test_train_preference import write_pairs
from test_train_sft import write_sft_data
from tiny import save_tiny_model
from tunesmith.config import RunConfig, load_config
from tunesmith.models import load_tokenizer
from tunesmith.models.templates import ensure_chat_template
from tunesmith.train.methods.base import Method
from tunesmith.train.methods.reference import Reference
from tunesmith.train.methods.registry import METHODS, BuildContext, row
from tunesmith.train.recipe import build_model, build_reference, prepare_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-registry"), layers=2, hidden=32)


def _data(tmp_path: Path, method: str) -> dict:
    if method == "sft":
        return {"train": str(write_sft_data(tmp_path / "sft.jsonl", n=8))}
    if method == "grpo":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(8)))
        (tmp_path / "registry_rewards.py").write_text("def length(completions, **kw):\n"
                                                       "    return [float(len(c)) for c in completions]\n")
        return {"train": str(prompts)}
    return {"train": str(write_pairs(tmp_path / "pairs.jsonl", n=8))}


def _cfg(tmp_path: Path, model_dir: Path, method: str) -> RunConfig:
    raw = {"model": str(model_dir), "method": method, "data": {**_data(tmp_path, method), "max_length": 256},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "output_dir": str(tmp_path / "run"),
           "train": {"batch_size": 2, "dtype": "fp32", "threads": 1}}
    if method == "grpo":
        raw["grpo"] = {"num_generations": 2, "max_new_tokens": 4,
                       "reward_funcs": [f"{tmp_path / 'registry_rewards.py'}:length"]}
    return load_config(None, raw=raw)


def test_every_method_of_the_config_has_a_row():
    names = typing.get_args(RunConfig.model_fields["method"].annotation)
    assert set(names) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_row_builds_and_takes_a_step(tmp_path, model_dir, name):
    cfg = _cfg(tmp_path, model_dir, name)
    method = row(cfg)
    tokenizer = load_tokenizer(str(model_dir))
    data = prepare_data(cfg, tokenizer, method)
    assert len(data.train) == 8 * (2 if name == "kto" else 1)  # KTO unpairs each pair into two examples
    assert len(data.lengths) == len(data.train) and min(data.lengths) > 0
    model = build_model(cfg, method, tokenizer, ensure_chat_template(tokenizer), torch.float32, is_main=True)
    kind = method.reference(cfg)
    ref = build_reference(cfg, kind, model, torch.device("cpu"))
    assert kind in (None, "sequence", "token") and ref is None  # LoRA: the adapter-disabled pass is the reference
    (tmp_path / "run").mkdir()  # the recipe makes it before building the method (GRPO logs there)
    trainer = method.build(BuildContext(cfg, tokenizer, model, Reference(ref), contextlib.nullcontext,
                                        tmp_path / "run"))
    assert isinstance(trainer, Method)
    module = trainer.wrap(model)
    batch = trainer.rollout(trainer.collate(data.train[:2]), 1)
    loss, metrics = trainer.loss(module, batch)
    assert torch.isfinite(loss) and trainer.units(batch) > 0 and trainer.trained_tokens(batch) >= 0
    assert all(torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all() for v in metrics.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    scoring = method.scoring(cfg)
    assert scoring["rule"] in ("loglik", "implicit", "policy", "reward")
    assert method.task == ("score" if name == "reward" else "causal")
