"""train.compile (models/compile.py): the decision and its reasons; compiled decoder layers whose
gradients are the eager ones with LoRA dropout inside the graph (no break, one mask per adapted
linear, kept for the backward), with and without gradient checkpointing; and a compiled
`tunesmith train` run that trains like an eager one."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from torch import nn

from test_train_sft import make_cfg, tiny_model_dir  # noqa: F401 (a fixture)
from tiny import make_model, make_tokenizer
from tunesmith.errors import TunesmithError
from tunesmith.models import compile as compiling
from tunesmith.models import dropout
from tunesmith.models.forward import SequenceLogProbs
from tunesmith.train.recipe import run


def test_choose_compiles_where_measured_and_says_why(monkeypatch):
    model = make_model(make_tokenizer(), seed=0)
    choose = compiling.choose
    long_run = dict(model=model, method="sft", plain_lora=True, device="cpu", dtype=torch.bfloat16, world=1)
    assert choose("off", steps=10_000, **long_run) == (False, "off")
    assert choose("on", steps=1, **long_run) == (True, "on")
    on, why = choose("auto", steps=compiling.AUTO_MIN_STEPS, **long_run)
    assert on and "measured" in why
    on, why = choose("auto", steps=compiling.AUTO_MIN_STEPS - 1, **long_run)
    assert not on and f"{compiling.AUTO_MIN_STEPS - 1} steps" in why
    assert choose("auto", steps=10_000, **dict(long_run, dtype=torch.float32))[0] is False
    assert choose("auto", steps=10_000, **dict(long_run, device="cuda"))[0] is False
    assert choose("auto", steps=10_000, **dict(long_run, method="dpo"))[0] is False
    assert choose("auto", steps=10_000, **dict(long_run, plain_lora=False))[0] is False  # full FT, LoRA dropout, DoRA, packing
    assert choose("on", steps=10, **dict(long_run, method="dpo")) == (True, "on")
    assert choose("auto", steps=10_000, **dict(long_run, world=2)) == (False, "auto: off (2 processes)")
    with pytest.raises(TunesmithError, match="2 processes"):
        choose("on", steps=10, **dict(long_run, world=2))
    assert choose("auto", steps=10_000, sharded=True, **long_run) == (False, "auto: off (train.distributed: fsdp2)")
    with pytest.raises(TunesmithError, match="not supported with train.distributed: fsdp2 yet"):
        choose("on", steps=10, sharded=True, **long_run)
    with pytest.raises(TunesmithError, match="Linear has none"):
        choose("on", steps=10, **dict(long_run, model=nn.Linear(2, 2)))
    monkeypatch.setattr(compiling, "_cpp_compiler", lambda: None)  # a machine without g++
    assert choose("auto", steps=10_000, **long_run) == (False, "auto: off (no C++ compiler for inductor)")
    with pytest.raises(TunesmithError, match=r"needs a C\+\+ compiler"):
        choose("on", steps=10, **long_run)


def test_yaml_on_and_off_and_a_wrong_value(tmp_path, tiny_model_dir):  # noqa: F811
    from tunesmith.config import load_config

    path = tmp_path / "run.yaml"
    for text, value in (("on", "on"), ("off", "off"), ("auto", "auto")):  # YAML 1.1: a bare on/off is a bool
        path.write_text(f"model: {tiny_model_dir}\ndata: {{train: x.jsonl}}\ntrain: {{compile: {text}}}\n")
        assert load_config(path).train.compile == value
    with pytest.raises(TunesmithError, match="train.compile.*'auto', 'on' or 'off'"):
        load_config(path, overrides=["train.compile=maybe"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_the_eager_gradients(tmp_path, monkeypatch, checkpointing):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # and unset again afterwards
    draws = []

    def keyed(x, p, slot):
        """A real mask of the draw's kind, seeded by the call (its linear's slot and its input) rather
        than by the order of the draws, which inductor may change within a layer (q/k/v are independent)"""
        draws.append(slot)
        seed = slot * 1_000_003 + round(float(x.double().sum()))  # coarse: inductor rounds the norm apart
        with torch.random.fork_rng():
            torch.manual_seed(seed % 2**31)
            return dropout.drop_mask(x.shape, p, x.device)

    monkeypatch.setattr(dropout, "_draw", keyed)
    tok = make_tokenizer()
    model = get_peft_model(make_model(tok, seed=5), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                                                               target_modules="all-linear", init_lora_weights=False))
    assert dropout.use_fast_dropout(model) == 14  # 7 adapted linears x 2 layers
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, len(tok), (3, 19), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100

    def step(m):
        draws.clear()
        torch.manual_seed(11)
        logps, _ = SequenceLogProbs(m)(ids, labels)
        (-logps.sum()).backward()
        return logps.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, len(draws)

    compiled = copy.deepcopy(model)
    eager_logps, eager_grads, eager_draws = step(model)
    torch._dynamo.utils.counters.clear()
    assert compiling.compile_layers(compiled) == 2
    logps, grads, n_draws = step(compiled)
    assert not torch._dynamo.utils.counters["graph_break"]  # one graph per layer call
    # every adapted linear draws its own mask (no two merged), the same number of times as eager
    # (under checkpointing the recomputation draws again from the replayed random state)
    assert n_draws == eager_draws == 14 * (2 if checkpointing else 1) and len(set(draws)) == 7
    torch.testing.assert_close(logps, eager_logps, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(eager_grads) and len(grads) == 28
    for name, grad in grads.items():  # inductor's attention and norms sum in another order: ~1e-6 apart
        err = float((grad - eager_grads[name]).norm() / eager_grads[name].norm())
        assert err < 1e-4, (name, err)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "compile")
    assert any((tmp_path / "home" / "compile").iterdir())  # inductor's cache, kept for the next run


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x and "eval" not in x]


def test_a_compiled_run_trains_like_an_eager_one(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled_calls = []
    real = compiling.compile_layers
    monkeypatch.setattr(compiling, "compile_layers", lambda m: compiled_calls.append(real(m)) or compiled_calls[-1])
    losses, manifests = {}, {}
    for setting in ("off", "on"):
        (tmp_path / setting).mkdir()
        cfg = make_cfg(tmp_path / setting, tiny_model_dir, train__compile=setting, train__max_steps=4,
                       train__eval_steps=0, train__save_steps=0, train__learning_rate=1e-3, lora__dropout=0.0)
        manifests[setting] = run(cfg)
        losses[setting] = _losses(tmp_path / setting / "run")
    assert compiled_calls == [2]  # both layers of the tiny model, in the compiled run only
    assert manifests["on"]["compile"] == {"layers": 2, "why": "on"}
    assert manifests["off"]["compile"] == {"layers": 0, "why": "off"}
    # fp32, no dropout (whose masks inductor may draw in another order): the same steps up to
    # inductor's summation order
    assert len(losses["on"]) == 4 and losses["on"] == pytest.approx(losses["off"], rel=1e-4)
    assert losses["on"][-1] < losses["on"][0]
