"""The engine and SFT on tiny in-process models: learning, accumulation, resume, faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import save_tiny_model
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.recipe import run

WORDS = ["sea", "sky", "wind", "Paris", "France", "poem", "tool", "call", "add", "print"]


def write_sft_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            w = [rnd.choice(WORDS) for _ in range(rnd.randint(1, 6))]
            f.write(json.dumps({"prompt": "Repeat: " + " ".join(w), "response": " ".join(w) + " done."}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), layers=2, hidden=32)


def make_cfg(tmp_path: Path, model_dir: Path, **over):
    data = write_sft_data(tmp_path / "train.jsonl")
    raw = {
        "model": str(model_dir), "method": "sft",
        "data": {"train": str(data), "eval_split": 0.25, "max_length": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "seed": 0, "save_steps": 4,
                  "eval_steps": 6, "logging_steps": 1, "dtype": "fp32", "threads": 1},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in over.items():  # data__packing=True → raw["data"]["packing"] = True
        *parents, last = key.split("__")
        node = raw
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[last] = value
    return load_config(None, raw=raw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if m.get("loss") is not None}


def test_lora_sft_learns_and_saves_reloadable_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, tiny_model_dir, train__max_steps=30, train__learning_rate=3e-2)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    manifest = run(cfg)
    out = Path(cfg.output_dir)
    losses = list(train_losses(out).values())
    assert all(map(lambda x: x == x and abs(x) < 1e9, losses))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    ev = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(ev) >= 2 and ev[-1] < ev[0]
    final = out / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()}
    assert (out / "run.json").exists() and (out / "config.yaml").exists()
    assert manifest["trainable_parameters"] < manifest["total_parameters"]
    # trainable (LoRA) tensors moved away from their init; the base weights did not move
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # reloads with plain transformers + peft, and the adapter changes the logits
    reloaded = PeftModel.from_pretrained(base, final)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        with reloaded.disable_adapter():
            plain = reloaded(ids).logits
        tuned = reloaded(ids).logits
    assert (plain - tuned).abs().max() > 1e-4


def test_full_finetuning_changes_all_weights(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, full=True, train__max_steps=4, train__learning_rate=1e-3)
    manifest = run(cfg)
    assert manifest["trainable_parameters"] == manifest["total_parameters"]
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "final").state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a if "norm" not in k and "rotary" not in k)


def test_grad_accumulation_equals_large_batch(tmp_path, tiny_model_dir):
    """1 x 8 and 4 x 2 (micro-batch x accumulation) give the same updates: the loss is
    normalised by the trained tokens of the whole step, not averaged per micro-batch."""
    runs = []
    for bs, acc in ((8, 1), (2, 4)):
        d = tmp_path / f"bs{bs}"
        d.mkdir()
        cfg = make_cfg(d, tiny_model_dir, train__batch_size=bs, train__grad_accum=acc, train__max_steps=4,
                       lora__dropout=0.0, data__group_by_length=False, data__eval_split=0.0)
        run(cfg)
        runs.append(Path(cfg.output_dir))
    la, lb = train_losses(runs[0]), train_losses(runs[1])
    assert la.keys() == lb.keys()
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5, abs=1e-6)
    wa = load_file(runs[0] / "final" / "adapter_model.safetensors")
    wb = load_file(runs[1] / "final" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_packing_trains_and_reports_efficiency(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, data__packing=True, train__batch_size=2, train__max_steps=6)
    manifest = run(cfg)
    assert manifest["padding_efficiency"] > 0.5
    assert all(x == x for x in train_losses(Path(cfg.output_dir)).values())


def test_nonfinite_loss_skips_update_then_stops(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.train.methods import sft

    calls = {"n": 0}
    orig = sft.SFT.loss

    def flaky(self, module, batch):
        loss, m = orig(self, module, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (3,) or calls["n"] >= 7 else loss), m

    monkeypatch.setattr(sft.SFT, "loss", flaky)
    cfg = make_cfg(tmp_path, tiny_model_dir, data__eval_split=0.0, train__max_steps=20, train__save_steps=2,
                   train__max_nonfinite=3)
    out = Path(cfg.output_dir)
    # Steps 7, 8, 9 fail: the weights of step 6 never gave a finite loss, so the newest good
    # checkpoint is 4 (step 5 was finite), kept although save_total_limit is 2.
    with pytest.raises(TunesmithError, match=rf"step 9: 3 consecutive non-finite .*last good checkpoint is "
                                             rf"{out / 'checkpoint-4'}"):
        run(cfg)
    m = metrics(out)
    assert [x["step"] for x in m if x.get("skipped_nonfinite")] == [3, 7, 8, 9]
    assert all(x["loss"] == x["loss"] for x in m if x.get("loss") is not None)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # what --resume picks
    assert sorted(p.name for p in out.glob("diverged-checkpoint-*")) == ["diverged-checkpoint-6",
                                                                         "diverged-checkpoint-8"]  # kept aside


def test_qlora_refused_on_cpu_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    cfg = make_cfg(tmp_path, tmp_path / "does-not-exist", lora__qlora=True)
    with pytest.raises(TunesmithError, match="qlora needs a CUDA GPU"):
        run(cfg)


def test_full_finetuning_that_does_not_fit_is_refused(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, full=True, train__memory_limit_gib=0.0001,
                   train__gradient_checkpointing=False)
    with pytest.raises(TunesmithError, match="use LoRA instead"):
        run(cfg)


# ----------------------------------------------------------------- subprocess: kill, SIGTERM

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from tunesmith.train.methods import sft
    sig, at = sys.argv[1], int(sys.argv[2])
    orig, calls = sft.SFT.loss, {"n": 0}
    def loss(self, module, batch):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), getattr(signal, sig))
        return orig(self, module, batch)
    sft.SFT.loss = loss
    from tunesmith.cli import main
    main(sys.argv[3:])
""")


def _cli(args: list[str], driver: tuple[str, int] | None = None, tmp: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    if driver:
        script = tmp / "driver.py"
        script.write_text(DRIVER)
        cmd = [sys.executable, str(script), driver[0], str(driver[1]), *args]
    else:
        cmd = [sys.executable, "-m", "tunesmith", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_interrupted_run_resumes_bit_identically(tmp_path, tiny_model_dir, sig):
    from tunesmith.config import save_config

    results = {}
    for name in ("straight", "interrupted"):
        d = tmp_path / name
        d.mkdir()
        cfg = make_cfg(d, tiny_model_dir, data__eval_split=0.0, train__save_steps=3, train__max_steps=10)
        save_config(cfg, d / "cfg.yaml")
        if name == "straight":
            p = _cli(["train", str(d / "cfg.yaml")])
            assert p.returncode == 0, p.stderr
        else:
            p = _cli(["train", str(d / "cfg.yaml")], driver=(sig, 8), tmp=d)
            if sig == "SIGKILL":
                assert p.returncode == -9
                assert not (d / "run" / "final").exists()
            else:  # SIGTERM: finishes step 8, saves a checkpoint, exits cleanly; SIGINT (Ctrl-C) too, exit 130
                assert p.returncode == (0 if sig == "SIGTERM" else 130), p.stderr
                assert sig in p.stderr and (d / "run" / "checkpoint-8").exists()
            p = _cli(["train", str(d / "cfg.yaml"), "--resume"])
            assert p.returncode == 0, p.stderr
            assert "resumed from" in p.stderr
        results[name] = d / "run"
    a, b = train_losses(results["straight"]), train_losses(results["interrupted"])
    assert list(a) == list(range(1, 11)) and a == b  # bit-identical per-step losses
    wa = load_file(results["straight"] / "final" / "adapter_model.safetensors")
    wb = load_file(results["interrupted"] / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_config(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, train__max_steps=4, train__save_steps=2)
    run(cfg)
    import shutil

    shutil.rmtree(Path(cfg.output_dir) / "final")
    changed = make_cfg(tmp_path, tiny_model_dir, train__max_steps=4, train__save_steps=2, train__learning_rate=1e-2)
    with pytest.raises(TunesmithError, match="train.learning_rate"):
        run(changed, resume=True)


def test_cli_bad_config_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x.jsonl}\ntrain: {learnig_rate: 1e-4}\n")
    p = _cli(["train", str(bad)])
    assert p.returncode == 1
    assert "did you mean `learning_rate`" in p.stderr and "Traceback" not in p.stderr


def test_dora_and_rslora_train_their_own_parameters(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, lora__dora=True, lora__rslora=True, train__max_steps=3)
    run(cfg)
    final = Path(cfg.output_dir) / "final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] and adapter_cfg["use_rslora"]
    keys = load_file(final / "adapter_model.safetensors").keys()
    assert any("lora_magnitude_vector" in k for k in keys)


def test_unknown_tracker_and_missing_tensorboard_are_refused(tmp_path, tiny_model_dir):
    import importlib.util

    with pytest.raises(TunesmithError, match="report_to"):
        make_cfg(tmp_path, tiny_model_dir, report_to=["wandb2"])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(TunesmithError, match="pip install tensorboard"):
            run(make_cfg(tmp_path, tiny_model_dir, report_to=["tensorboard"]))
