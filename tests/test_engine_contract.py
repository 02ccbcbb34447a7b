"""The engine's side of the method contract (train/methods/base.py) and its state file."""

from __future__ import annotations

import json

import torch
from torch import nn

from tunesmith.train import checkpoint as ckpt
from tunesmith.train.engine import LoopArgs, TrainerState, fit
from tunesmith.train.methods.base import Method


class _Scale(nn.Module):
    def __init__(self, model, head_chunk=None):
        super().__init__()
        self.model = model
        assert head_chunk is None  # no memory plan here: the engine's default

    def forward(self, x):
        return self.model(x)


class _Recording(Method):
    """A least-squares "method" that logs every call the engine makes."""

    wrap = _Scale

    def __init__(self):
        self.calls: list[tuple] = []

    def collate(self, items):
        self.calls.append(("collate", len(items)))
        return {"x": torch.tensor(items, dtype=torch.float32)[:, None]}

    def rollout(self, batch, step):
        self.calls.append(("rollout", step))
        return batch

    def units(self, batch):
        return len(batch["x"])

    def loss(self, module, batch):
        self.calls.append(("loss",))
        err = (module(batch["x"]) - 2 * batch["x"]).pow(2).sum()
        return err, {"err": err.detach()}


def test_fit_calls_the_method_contract_in_order(tmp_path):
    from accelerate import Accelerator

    method = _Recording()
    items = [float(i) for i in range(8)]
    args = LoopArgs(output_dir=tmp_path, max_steps=2, batch_size=2, grad_accum=2, learning_rate=1e-2,
                    save_steps=0, eval_steps=0, group_by_length=False)
    result = fit(nn.Linear(1, 1), method, items, items[:2], [1] * len(items), args,
                 accelerator=Accelerator(cpu=True), save_final=lambda path, state: None)
    assert result.step == 2
    train = [c for c in method.calls if c[0] == "rollout" and c[1] is not None]
    assert [c[1] for c in train] == [1, 1, 2, 2]  # 1-based step, every micro-batch
    first_loss = method.calls.index(("loss",))
    assert method.calls[:first_loss] == [("collate", 2), ("rollout", 1)] * 2  # both micro-batches before any backward
    assert method.calls[-3:] == [("collate", 2), ("rollout", None), ("loss",)]  # the final eval
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state == {"skipped": 0, "consecutive_nonfinite": 0, "best": {}, "last_good_step": 2}  # the final eval
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-2").rng_state["generators"] == {}


def test_trainer_state_keeps_the_file_format():
    old = {"skipped": 3, "consecutive_nonfinite": 1, "best": {"eval_loss": 0.5}}
    assert TrainerState.from_dict(old).to_dict() == {**old, "last_good_step": -1}  # older files still load
    assert list(TrainerState().to_dict()) == ["skipped", "consecutive_nonfinite", "best", "last_good_step"]
    assert TrainerState.from_dict({"skipped": 2}) == TrainerState(skipped=2)
