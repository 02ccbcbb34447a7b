"""Checkpoints: bit-exact resume, no pickle, saves that survive crashes and SIGKILL.

    .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_dir, verify_manifest, write_manifest
from tunesmith.train.checkpoint import (
    capture_rng,
    config_diff,
    find_checkpoints,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    unflatten_state,
)

# ---------------------------------------------------------------- a tiny run to resume


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 16), nn.Dropout(0.3), nn.Linear(16, 1)

    def forward(self, x):  # x: [batch, 8] -> [batch, 1]
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


WARMUP, TOTAL = 3, 20
_g = torch.Generator().manual_seed(0)
DATA_X, DATA_Y = torch.randn(32, 8, generator=_g), torch.randn(32, 1, generator=_g)


def warmup_cosine(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def build(seed: int):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)


def run_steps(model, opt, sched, gen, n):
    """n steps of 4 samples each; draws from every RNG a real loop might touch."""
    model.train()
    losses = []
    for _ in range(n):
        idx = torch.randperm(32, generator=gen)[:4]  # the sampler's shuffle
        jitter = 1e-3 * (float(np.random.normal()) + random.random())  # numpy + python RNGs
        loss = F.mse_loss(model(DATA_X[idx] + jitter), DATA_Y[idx])  # dropout: torch RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return losses


def save_run(root, step, model, opt, sched, gen, **kw):
    return save_checkpoint(
        root,
        step,
        state_dicts={"model": model.state_dict()},
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        rng_state=capture_rng({"data": gen}),
        cursor={"epoch": 0, "sampler_seed": 1, "samples_consumed": 4 * step, "global_step": step},
        trainer_state={"loss": [1.5, float("nan")], "skipped_nonfinite_steps": 1},
        config={"train": {"lr": 1e-2, "output_dir": Path(root)}},
        **kw,
    )


def tiny_save(root, step, **kw):
    """A small checkpoint for the file-handling tests (no model needed)."""
    kw.setdefault("trainer_state", {"step": step})
    return save_checkpoint(
        root,
        step,
        state_dicts={"model": {"w": torch.full((64, 64), float(step))}},
        optimizer_state={"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": []},
        scheduler_state={"last_epoch": step},
        rng_state=capture_rng(),
        cursor={"global_step": step},
        config={},
        **kw,
    )


def same(a, b) -> bool:
    """Strict equality: types (tuple vs list, int vs float vs bool), dtypes, nan == nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(k2) and same(a[k], b[k2]) for k, k2 in zip(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# ---------------------------------------------------------------- exact resume


def test_resume_continues_bit_identically(tmp_path):
    model, opt, sched = build(0)
    gen = torch.Generator().manual_seed(1)
    run_steps(model, opt, sched, gen, 5)
    path = save_run(tmp_path, 5, model, opt, sched, gen)
    losses_a = run_steps(model, opt, sched, gen, 6)

    def resumed(restore_global_rng: bool):
        random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a fresh process's RNGs
        model2, opt2, sched2 = build(123)  # different initial weights: the load must win
        ckpt = load_checkpoint(path)
        model2.load_state_dict(ckpt.state_dicts["model"])
        opt2.load_state_dict(ckpt.optimizer_state)
        sched2.load_state_dict(ckpt.scheduler_state)
        gen2 = torch.Generator()
        if restore_global_rng:
            restore_rng(ckpt.rng_state, {"data": gen2})
        else:
            gen2.set_state(ckpt.rng_state["generators"]["data"])
        return ckpt, model2, opt2, sched2, run_steps(model2, opt2, sched2, gen2, 6)

    ckpt, model2, opt2, sched2, losses_b = resumed(restore_global_rng=True)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))
    assert sched.get_last_lr() == sched2.get_last_lr()
    assert same(opt.state_dict(), opt2.state_dict())
    assert ckpt.step == 5 and ckpt.cursor["samples_consumed"] == 20
    assert ckpt.config == {"train": {"lr": 1e-2, "output_dir": str(tmp_path)}}
    assert math.isnan(ckpt.trainer_state["loss"][1])
    # Dropout draws from the global torch RNG: without restoring it the run diverges.
    *_, losses_c = resumed(restore_global_rng=False)
    assert not all(torch.equal(a, c) for a, c in zip(losses_a, losses_c))


# ---------------------------------------------------------------- flatten / unflatten


def through_files(obj, tmp_path):
    """flatten → safetensors file + JSON text → unflatten, as a checkpoint does."""
    tensors, skeleton = flatten_state(obj)
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "t.safetensors")
    text = json.dumps(skeleton, allow_nan=False)
    return unflatten_state(st.load_file(tmp_path / "t.safetensors"), json.loads(text))


def test_flatten_round_trips_tricky_values(tmp_path):
    obj = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
            1: {"step": torch.tensor(7), "exp_avg_sq": torch.ones(2, dtype=torch.bfloat16)},
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                          "amsgrad": False, "foreach": None, "params": [0, 1]}],
        "keys": {1: "int", "1": "str", (2, "x"): "tuple", None: "none", 2.5: "float", False: "bool"},
        "floats": [math.inf, -math.inf, math.nan, -0.0, 0.1, 1.0, 1e-300, 2**70],
        "bools": (True, False, 0, 1),
        "empties": ([], (), {}, ""),
        "nested": ((1, (2.0, None)), [()]),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "looks_like_a_tag": {"__tensor__": "not a tensor"},
        "text": "héllo ✓",
    }
    back = through_files(obj, tmp_path)
    assert same(back, obj)
    assert type(back["state"][0]["step"]) is torch.Tensor and back["state"][0]["step"].dim() == 0

    with pytest.raises(TypeError, match="at x.0"):
        flatten_state({"x": [object()]})


def test_real_optimizer_and_scheduler_state_round_trip(tmp_path):
    model, opt, sched = build(0)
    run_steps(model, opt, sched, torch.Generator().manual_seed(0), 2)
    assert same(through_files(opt.state_dict(), tmp_path), opt.state_dict())
    assert same(through_files(sched.state_dict(), tmp_path), sched.state_dict())


def test_rng_states_survive_the_files(tmp_path):
    gen = torch.Generator().manual_seed(5)
    state = through_files(capture_rng({"g": gen}), tmp_path)
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    restore_rng(state, {"g": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    with pytest.raises(TunesmithError, match="'other'"):
        restore_rng(state, {"other": torch.Generator()})


# ---------------------------------------------------------------- atomicity


def test_crash_while_writing_leaves_previous_checkpoint(tmp_path, monkeypatch):
    tiny_save(tmp_path, 1)
    real_save = st.save_file

    def failing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)  # the file is there, half a checkpoint exists
        if Path(filename).name == "optimizer.safetensors":
            raise OSError("No space left on device")

    monkeypatch.setattr(st, "save_file", failing_save)
    with pytest.raises(TunesmithError, match="no space left on the device while writing .*checkpoint-2"):
        tiny_save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no tmp left either
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert load_checkpoint(tmp_path / "checkpoint-1").step == 1


def test_failed_rename_when_resaving_a_step_keeps_the_old_one(tmp_path, monkeypatch):
    tiny_save(tmp_path, 3, trainer_state={"version": 1})
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp-checkpoint-3-"):
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        tiny_save(tmp_path, 3, trainer_state={"version": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert load_checkpoint(tmp_path / "checkpoint-3").trainer_state == {"version": 1}
    tiny_save(tmp_path, 3, trainer_state={"version": 2})  # a real re-save replaces it
    assert load_checkpoint(tmp_path / "checkpoint-3").trainer_state == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    tiny_save(tmp_path, 1)
    stale = tmp_path / ".tmp-checkpoint-2-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert find_checkpoints(tmp_path) == ([tmp_path / "checkpoint-1"], [])
    # Killed between "move the old checkpoint-1 aside" and "rename the new one in":
    orphan = tmp_path / ".old-checkpoint-1-deadbeef"
    os.rename(tmp_path / "checkpoint-1", orphan)
    assert latest_checkpoint(tmp_path) == orphan
    assert load_checkpoint(orphan).step == 1
    tiny_save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]


SAVE_FOREVER = textwrap.dedent(
    """
    import sys, torch
    from tunesmith.train.checkpoint import capture_rng, save_checkpoint
    big = {"w": torch.randn(512, 1024)}  # 2 MiB of fp32, twice per checkpoint
    opt = {"state": {0: {"exp_avg": torch.randn(512, 1024)}}, "param_groups": []}
    step = int(sys.argv[2])
    while True:
        step += 1
        save_checkpoint(sys.argv[1], step, state_dicts={"model": big}, optimizer_state=opt,
                        scheduler_state={}, rng_state=capture_rng(), cursor={"global_step": step},
                        trainer_state={}, config={}, keep_last=2)
        print(step, flush=True)
    """
)


def test_sigkill_mid_save_never_leaves_a_broken_checkpoint(tmp_path):
    rng = random.Random(0)
    last = 0
    for _ in range(2):  # the second run starts over a folder the first was killed in
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(tmp_path), str(last)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = proc.stdout.readline()  # blocks until one save finished (or the child died)
        assert first, proc.communicate()[1]
        try:
            proc.wait(timeout=rng.uniform(0.1, 0.4))
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()
        assert proc.returncode == -9
        complete, incomplete = find_checkpoints(tmp_path)
        assert complete and incomplete == []
        for path in complete:
            load_checkpoint(path)  # full sha256 verification
        last = load_checkpoint(complete[-1]).step


# ---------------------------------------------------------------- incomplete, corrupt, rotation


def test_incomplete_checkpoint_is_skipped_and_named(tmp_path):
    tiny_save(tmp_path, 1)
    tiny_save(tmp_path, 2)
    (tmp_path / "checkpoint-2" / "rng.safetensors").unlink()
    tiny_save(tmp_path, 3)
    (tmp_path / "checkpoint-3" / "manifest.json").unlink()
    complete, incomplete = find_checkpoints(tmp_path)
    assert complete == [tmp_path / "checkpoint-1"]
    assert incomplete == [
        (tmp_path / "checkpoint-2", "rng.safetensors is missing"),
        (tmp_path / "checkpoint-3", "manifest.json is missing (the save never finished)"),
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(TunesmithError, match=r"checkpoint-2: rng.safetensors is missing; delete it"):
        load_checkpoint(tmp_path / "checkpoint-2")


def test_corrupted_file_is_caught_on_load(tmp_path):
    path = tiny_save(tmp_path, 1)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # flip tensor bytes, same size
    target.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == path  # sizes match: only the sha256 can tell
    with pytest.raises(TunesmithError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "model.safetensors is corrupted" in msg and "--resume" in msg


def test_keep_last_deletes_the_oldest_but_never_the_new_one(tmp_path):
    for step in range(1, 6):
        tiny_save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    tiny_save(tmp_path, 2, keep_last=1)  # e.g. re-saving after resuming from an earlier step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


# ---------------------------------------------------------------- no pickle


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    model, opt, sched = build(0)
    gen = torch.Generator().manual_seed(1)
    run_steps(model, opt, sched, gen, 2)
    path = save_run(tmp_path, 2, model, opt, sched, gen)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert "model.safetensors" in json.loads((path / "manifest.json").read_text())["files"]
    for f in files:
        head = f.read_bytes()[:4]
        assert f.suffix in {".safetensors", ".json"}, f
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f  # pickle / torch.save zip

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, refuse)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.state_dicts["model"]["fc1.weight"], model.state_dict()["fc1.weight"])


def test_atomic_dir_and_manifest_work_for_any_folder(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("x")
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
    for text in ("one", "two"):
        with atomic_dir(final) as d:
            (d / "sub").mkdir()
            (d / "sub" / "a.txt").write_text(text)
            write_manifest(d, {"kind": "export"})
    assert list(tmp_path.iterdir()) == [final]
    assert verify_manifest(final)["files"]["sub/a.txt"]["size"] == 3
    (final / "sub" / "a.txt").write_text("six")
    with pytest.raises(TunesmithError, match="export .*final: sub/a.txt is corrupted"):
        verify_manifest(final, kind="export", fix="export again")


def test_config_diff_names_dotted_keys():
    old = {"model": {"name": "a", "lora": {"r": 8}}, "train": {"lr": 1e-4, "output_dir": "x"}, "seed": 1}
    new = {"model": {"name": "a", "lora": {"r": 16}}, "train": {"lr": 1e-4, "output_dir": "y", "epochs": 2},
           "seed": 1.0}
    assert config_diff(old, new) == ["model.lora.r", "seed", "train.epochs", "train.output_dir"]
    assert config_diff(old, new, ignore={"train.output_dir", "model"}) == ["seed", "train.epochs"]
    assert config_diff({"b": (1, 2), "p": Path("x")}, {"b": [1, 2], "p": "x"}) == []
