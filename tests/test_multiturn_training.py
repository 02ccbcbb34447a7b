"""Multi-turn reasoning data through a history-rewriting template, end to end on a tiny model.

The Qwen3 template (the ``qwen3`` family tunesmith ships, Qwen/Qwen3-0.6B's own text)
strips ``<think>`` from earlier assistant turns, so every conversation trains as one
sequence per assistant turn (data/render.py). This file checks that such a run trains and
its held-out loss falls, that run.json and the start-up line say which mode was used and
what it cost, that the saved tokenizer carries the template that training used, and that
``compare`` takes the held-out SFT file as prompts with its answers as references.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tiny import save_tiny_model
from tunesmith.config import load_config
from tunesmith.models.templates import FAMILIES
from tunesmith.train.recipe import run

WORDS = ["sea", "sky", "wind", "sun", "rain", "tree", "stone", "bird"]


def write_conversations(path: Path, n: int, seed: int) -> Path:
    """Two- and three-turn chats: the answer repeats the words backwards; the trace says how.
    Reasoning arrives in the field forms people use (reasoning_content and a <think> prefix)."""
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": "Reverse the words."}]
            for turn in range(rnd.choice((2, 3))):
                w = [rnd.choice(WORDS) for _ in range(rnd.randint(2, 4))]
                trace = "The words are " + ", ".join(w) + "; backwards they read " + ", ".join(w[::-1]) + "."
                answer = " ".join(w[::-1])
                msgs.append({"role": "user", "content": "Reverse: " + " ".join(w)})
                if turn % 2:
                    msgs.append({"role": "assistant", "content": f"<think>\n{trace}\n</think>\n\n{answer}"})
                else:
                    msgs.append({"role": "assistant", "content": answer, "reasoning_content": trace})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiturn")
    model = save_tiny_model(tmp / "model", layers=2, hidden=32)
    raw = {
        "model": str(model), "method": "sft",
        "data": {"train": str(write_conversations(tmp / "train.jsonl", 40, 0)),
                 "eval": str(write_conversations(tmp / "eval.jsonl", 8, 1)),
                 "max_length": 384, "chat_template": "qwen3"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["embed_tokens", "lm_head"]},
        "train": {"max_steps": 16, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "save_steps": 0,
                  "eval_steps": 8, "logging_steps": 1, "dtype": "fp32", "threads": 1},
        "output_dir": str(tmp / "run"),
    }
    manifest = run(load_config(None, raw=raw))
    return tmp, manifest


def test_history_rewriting_template_trains_per_turn_and_held_out_loss_falls(trained):
    tmp, manifest = trained
    mode = manifest["chat_template_mode"]
    assert mode["mode"] == "per-turn" and mode["per_turn_records"] == mode["records"] == 40
    assert mode["sequences"] > mode["records"] and mode["tokens"] > mode["tokens_single"]
    assert manifest["chat_template_source"] == "family:qwen3"
    evals = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl") if '"eval_loss"' in line]
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, evals
    saved = AutoTokenizer.from_pretrained(tmp / "run" / "final")
    assert "<think>" in saved.get_vocab() and saved.eos_token == FAMILIES["qwen3"].end_of_turn
    assert saved.chat_template == AutoTokenizer.from_pretrained(tmp / "run" / "final").chat_template
    assert "reasoning_content" in saved.chat_template  # the template training used, not the base's ChatML


def test_compare_takes_sft_records_as_prompts_with_references(trained):
    from tunesmith.evaluate.compare import compare_models, outputs_table
    from tunesmith.evaluate.runner import EvalSettings, evaluate_models

    tmp, _ = trained
    specs = [str(tmp / "model"), str(tmp / "run")]
    result = compare_models(specs, str(tmp / "eval.jsonl"), max_new_tokens=8)
    (suite,) = result["prompts"]
    prompts = result["prompts"][suite]
    records = [json.loads(line) for line in open(tmp / "eval.jsonl")]
    assert len(prompts) == len(records)
    for p, rec in zip(prompts, records):
        last = rec["messages"][-1]["content"]
        assert p["reference"] == last.split("</think>")[-1].strip()  # the answer, not the trace
        assert p["prompt"] == rec["messages"][-2]["content"]  # the user turn the model answers
    assert all(isinstance(o, str) for o in result["outputs"][suite][specs[1]])
    assert [c.header for c in outputs_table(result, suite).columns][:2] == ["prompt", "reference"]
    # the same file as an accuracy suite: the last assistant turn is the reference
    scored = evaluate_models(specs[1:], ["accuracy"], EvalSettings(max_new_tokens=8, method="contains"),
                             data=str(tmp / "eval.jsonl"))
    items = scored["results"]["accuracy"][specs[1]]["items"]
    assert len(items) == len(records) and all(isinstance(it["passed"], bool) for it in items)
