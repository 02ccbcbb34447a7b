"""train.compile (models/compile.py): the decision and its reasons, and compiled decoder layers
that train like eager ones — SFT with LoRA dropout (our mask as an opaque op inside the graph),
under gradient checkpointing, and DPO (the reference is the adapter switched off)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from test_train_sft import make_cfg, tiny_model_dir  # noqa: F401 (a fixture)
from tiny import make_model, make_tokenizer
from tunesmith.errors import TunesmithError
from tunesmith.models import compile as compiling
from tunesmith.train.recipe import run


def test_choose_compiles_where_measured_and_says_why():
    model = make_model(make_tokenizer(), seed=0)
    choose = compiling.choose
    long_run = dict(model=model, method="sft", device="cpu", dtype=torch.bfloat16, world=1)
    assert choose("off", steps=10_000, **long_run) == (False, "off")
    assert choose("on", steps=1, **long_run) == (True, "on")
    on, why = choose("auto", steps=compiling.AUTO_MIN_STEPS, **long_run)
    assert on and "measured" in why
    on, why = choose("auto", steps=compiling.AUTO_MIN_STEPS - 1, **long_run)
    assert not on and f"{compiling.AUTO_MIN_STEPS - 1} steps" in why
    assert choose("auto", steps=10_000, **dict(long_run, dtype=torch.float32))[0] is False
    assert choose("auto", steps=10_000, **dict(long_run, device="cuda"))[0] is False
    assert choose("auto", steps=10_000, **dict(long_run, method="dpo"))[0] is False
    assert choose("on", steps=10, **dict(long_run, method="dpo")) == (True, "on")
    assert choose("auto", steps=10_000, **dict(long_run, world=2)) == (False, "auto: off (2 processes)")
    with pytest.raises(TunesmithError, match="2 processes"):
        choose("on", steps=10, **dict(long_run, world=2))
    with pytest.raises(TunesmithError, match="Linear has none"):
        choose("on", steps=10, **dict(long_run, model=nn.Linear(2, 2)))


def test_yaml_on_and_off_and_a_wrong_value(tmp_path, tiny_model_dir):  # noqa: F811
    from tunesmith.config import load_config

    path = tmp_path / "run.yaml"
    for text, value in (("on", "on"), ("off", "off"), ("auto", "auto")):  # YAML 1.1: a bare on/off is a bool
        path.write_text(f"model: {tiny_model_dir}\ndata: {{train: x.jsonl}}\ntrain: {{compile: {text}}}\n")
        assert load_config(path).train.compile == value
    with pytest.raises(TunesmithError, match="train.compile.*'auto', 'on' or 'off'"):
        load_config(path, overrides=["train.compile=maybe"])


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x and "eval" not in x]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One TUNESMITH_HOME for this module's runs: the first compiles cold, the second reads the cache."""
    return tmp_path_factory.mktemp("home")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_like_eager(tmp_path, tiny_model_dir, home, monkeypatch, checkpointing):  # noqa: F811
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled_calls = []
    real = compiling.compile_layers
    monkeypatch.setattr(compiling, "compile_layers", lambda m: compiled_calls.append(real(m)) or compiled_calls[-1])
    losses, manifests = {}, {}
    for setting in ("off", "on"):
        (tmp_path / setting).mkdir()
        cfg = make_cfg(tmp_path / setting, tiny_model_dir, train__compile=setting, train__max_steps=4,
                       train__eval_steps=0, train__save_steps=0, train__learning_rate=1e-3, train__gradient_checkpointing=checkpointing)
        manifests[setting] = run(cfg)
        losses[setting] = _losses(tmp_path / setting / "run")
    assert compiled_calls == [2]  # both layers of the tiny model, in the compiled run only
    assert manifests["on"]["compile"] == {"layers": 2, "why": "on"}
    assert manifests["off"]["compile"] == {"layers": 0, "why": "off"}
    assert manifests["on"]["gradient_checkpointing"] is checkpointing
    assert any((home / "compile").iterdir())  # inductor's cache, kept for the next run
    # fp32 with LoRA dropout 0.1: the same masks in the same order, so the first step's loss is the
    # eager one; inductor sums in another order, and Adam's normalised steps let that grow
    # to ~1e-3 by step 4 — within bf16's rounding (2^-8), the issue's tolerance
    assert len(losses["on"]) == 4 and losses["on"][0] == pytest.approx(losses["off"][0], rel=1e-6)
    assert losses["on"] == pytest.approx(losses["off"], rel=2**-8)
    assert losses["on"][-1] < losses["on"][0]
