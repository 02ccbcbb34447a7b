"""The RLHF path on tiny models: a reward model from pairs, then GRPO against a reward
function or that reward model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_train_kto_reference import evals, with_
from test_train_preference import model_dir, pref_cfg  # noqa: F401 (fixture)
from test_train_sft import metrics
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.methods.losses import bradley_terry_loss
from tunesmith.train.recipe import run


def test_bradley_terry_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(16, generator=g), torch.randn(16, generator=g)
    ours = bradley_terry_loss(c, r, margin=0.3, center_coefficient=0.01).mean()
    # TRL RewardTrainer.compute_loss with a margin column and center_rewards_coefficient=0.01
    ref = -torch.nn.functional.logsigmoid(c - r - 0.3).mean() + 0.01 * torch.mean((c + r) ** 2)
    assert float(ours) == pytest.approx(float(ref), abs=1e-7)
    assert float(bradley_terry_loss(c, r).mean()) == pytest.approx(
        float(-torch.log(torch.sigmoid(c - r)).mean()), abs=1e-6)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, model_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("rm")
    cfg = with_(pref_cfg(tmp, model_dir, "reward"), reward={"center_coefficient": 0.01},
                lora={"r": 8, "alpha": 16, "dropout": 0.0}, train={"max_steps": 24, "learning_rate": 2e-2})
    run(cfg)
    return cfg


def test_reward_model_learns_the_pairs(reward_run):
    ev = evals(reward_run)
    assert ev[0]["step"] == 0 and ev[-1]["eval_accuracy"] > 0.9, ev
    assert ev[-1]["eval_margin"] > ev[0]["eval_margin"]
    final = Path(reward_run.output_dir) / "final"
    assert (final / "adapter_config.json").exists()
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_reward_model_reloads_with_plain_transformers_and_ranks_pairs(reward_run, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from tunesmith.models.load import load_scorer
    from tunesmith.infer.score import score_conversations

    final = Path(reward_run.output_dir) / "final"
    pairs = [json.loads(x) for x in Path(reward_run.data.train).read_text().splitlines()][:8]
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
    model, tok = load_scorer(final)
    good = score_conversations(model, tok, prompts, [p["chosen"] for p in pairs])
    bad = score_conversations(model, tok, prompts, [p["rejected"] for p in pairs])
    assert sum(g > b for g, b in zip(good, bad)) >= 7
    # plain peft + transformers: the head at the last token gives the same score
    plain = AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1).eval()
    ptok = AutoTokenizer.from_pretrained(final)
    text = ptok.apply_chat_template(prompts[0] + [{"role": "assistant", "content": pairs[0]["chosen"]}],
                                    tokenize=False)
    ids = ptok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = plain.base_model.model.model(**ids).last_hidden_state[:, -1]
        score = plain.base_model.model.score(hidden).item()
    assert score == pytest.approx(good[0], abs=1e-4)


def test_score_command_writes_scores_and_pair_accuracy(reward_run, tmp_path):
    from tunesmith.cli import main

    out = tmp_path / "scores.jsonl"
    main(["score", str(Path(reward_run.output_dir) / "final"), "--data", reward_run.data.train, "-o", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 32 and all("score_chosen" in r and "score_rejected" in r for r in rows)
    assert sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows) > 0.9


REWARDS = '''
def short(completions, **kw):
    """Reward stopping early: 1 for an empty answer, 0 at max_new_tokens."""
    return [1.0 - min(len(c), 24) / 24 for c in completions]


def with_answer(completions, answer, **kw):
    return [float(a.split()[0] in c) for c, a in zip(completions, answer)]
'''


def grpo_cfg(tmp_path: Path, model_dir: Path, funcs: list[str], **grpo):
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Say something about item {i}.", "answer": f"item{i} yes"}) + "\n")
    raw = {"model": str(model_dir), "method": "grpo", "data": {"train": str(prompts), "max_length": 64},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "grpo": {"num_generations": 4, "max_new_tokens": 12, "temperature": 1.0, "beta": 0.04,
                    "reward_funcs": funcs, **grpo},
           "train": {"max_steps": 20, "batch_size": 4, "learning_rate": 3e-2, "save_steps": 0, "dtype": "fp32",
                     "threads": 1, "eval_steps": 0},
           "output_dir": str(tmp_path / "grpo")}
    return load_config(None, raw=raw)


def test_grpo_raises_the_reward_of_a_reward_function(tmp_path, model_dir):  # noqa: F811
    (tmp_path / "rw.py").write_text(REWARDS)
    cfg = grpo_cfg(tmp_path, model_dir, [f"{tmp_path / 'rw.py'}:short"])
    run(cfg)
    logged = [m for m in metrics(Path(cfg.output_dir)) if "reward" in m]
    first = sum(m["reward"] for m in logged[:4]) / 4
    last = sum(m["reward"] for m in logged[-4:]) / 4
    assert last > first + 0.2, [round(m["reward"], 3) for m in logged]
    # the KL penalty keeps the policy near the reference: bounded (measured ≤ ~13 at this
    # deliberately high learning rate for a 2-layer model), never diverging
    kls = [m["kl"] for m in logged]
    assert all(0 <= k < 20 for k in kls) and kls[0] < 1e-6, kls
    assert {"reward_std", "kl", "clip_ratio", "rewards/short", "completion_length"} <= set(logged[-1])
    samples = [json.loads(x) for x in (Path(cfg.output_dir) / "completions.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])


def test_grpo_against_a_reward_model_and_a_function_with_weights(tmp_path, model_dir, reward_run):  # noqa: F811
    (tmp_path / "rw.py").write_text(REWARDS)
    rm = str(Path(reward_run.output_dir) / "final")
    cfg = grpo_cfg(tmp_path, model_dir, [rm, f"{tmp_path / 'rw.py'}:with_answer"], reward_weights=[1.0, 0.5])
    cfg = with_(cfg, train={"max_steps": 2})
    run(cfg)
    last = [m for m in metrics(Path(cfg.output_dir)) if "reward" in m][-1]
    assert "rewards/with_answer" in last and any(k.startswith("rewards/") and "answer" not in k for k in last)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_aggregation(loss_type):
    from tunesmith.train.methods.grpo import GRPO
    from tunesmith.train.methods.reference import Reference

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp = (torch.randn(3, 4, generator=g) - 2).requires_grad_(True)
    ref = torch.randn(3, 4, generator=g) - 2
    adv = torch.tensor([1.0, -0.5, -0.5])
    method = GRPO.__new__(GRPO)
    method.beta, method.eps_low, method.eps_high, method.loss_type, method.max_new_tokens = 0.04, 0.2, 0.2, loss_type, 4
    method.reference = Reference(lambda **_: (ref, mask))
    batch = {"input_ids": None, "labels": None, "attention_mask": None, "position_ids": None, "advantages": adv,
             "lengths": mask.sum(1), "rewards": torch.zeros(3), "reward_std": torch.zeros(1), "reward_parts": {}}
    loss, _ = method.loss(lambda **_: (logp, mask), batch)
    # the per-token objective at ratio 1 (one step per batch): -A + beta * k3(ref, logp)
    d = ref - logp.detach()
    tok = (-adv.unsqueeze(1) + 0.04 * (torch.exp(d) - d - 1)) * mask
    expected = {"grpo": (tok.sum(1) / mask.sum(1)).sum(), "dapo": tok.sum(), "dr_grpo": tok.sum()}[loss_type]
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    loss.backward()  # the gradient of the ratio term is -A per token (TRL's with num_iterations=1)
    grad_expected = (-adv.unsqueeze(1) - 0.04 * (torch.exp(d) - 1)) * mask
    if loss_type == "grpo":
        grad_expected = grad_expected / mask.sum(1, keepdim=True)
    assert torch.allclose(logp.grad, grad_expected, atol=1e-6)


def test_grpo_config_errors_are_one_sentence(tmp_path, model_dir):  # noqa: F811
    with pytest.raises(TunesmithError, match="reward_weights has 1 values for 2"):
        grpo_cfg(tmp_path, model_dir, ["a:b", "c:d"], reward_weights=[1.0])
    cfg = grpo_cfg(tmp_path, model_dir, ["no_such_module_xyz:f"])
    with pytest.raises(TunesmithError, match="cannot import no_such_module_xyz"):
        run(cfg)
    with pytest.raises(TunesmithError, match="needs a `grpo:` section"):
        load_config(None, raw={"method": "grpo", "data": {"train": "x.jsonl"}})


@pytest.mark.parametrize("fmt", ["adapter", "merged"])
def test_reward_model_exports_and_verifies(reward_run, tmp_path, fmt):
    from tunesmith.export.export import export_run

    out = export_run(reward_run.output_dir, fmt, tmp_path / fmt)  # verify runs in a fresh process
    manifest = json.loads((out / "tunesmith.json").read_text())
    assert manifest["task"] == "score" and not (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in card and "num_labels=1" in card
