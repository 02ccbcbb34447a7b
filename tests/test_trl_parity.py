"""Parity with TRL: tunesmith's SFT loss per step equals TRL ``SFTTrainer``'s.

Setup (both sides load the same saved tiny model, fp32, full fine-tuning, no gradient
checkpointing, no packing, no dropout, nothing truncated):

- data: 8 prompt-completion records. tunesmith reads ``{"prompt": str, "completion": str}``
  (→ user + assistant message, loss on the assistant span incl. the ``<|im_end|>\\n`` the
  template closes it with); TRL gets the conversational prompt-completion format with
  ``completion_only_loss=True``. The test first checks that both produce the same token
  ids and the same trained tokens, record by record.
- batches: one optimizer step = the whole training set (8 records), so neither side's
  sampler order can change what a step sees: batch 8 x accumulation 1, and batch 4 x
  accumulation 2 (the step's micro-batches may split differently on the two sides, but both
  normalise the summed NLL by the trained tokens of the whole step — TRL through
  ``num_items_in_batch`` — so the step loss does not depend on the split).
- optimizer: AdamW (``optim="adamw_torch"``: the plain, non-fused torch AdamW, as tunesmith),
  lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0, max_grad_norm 1.0 on both.
- schedule: ``linear`` with no warmup. transformers' linear lambda is
  ``(total - s) / (total - warmup)`` after ``s / warmup`` warmup; tunesmith's
  (engine.lr_lambda) is ``1 - (s - warmup) / (total - warmup)`` after ``(s + 1) / (warmup + 1)``
  warmup — identical when warmup = 0, different during a warmup (transformers starts at lr 0).
- TRL's loss: captured exactly per micro-batch from ``compute_loss`` (a subclass records
  it) and summed over the step's micro-batches (each is already divided by the step's tokens);
  ``state.log_history``'s ``loss`` is also checked against it (transformers 5.23 does not
  round it, but it is a float32 ``.item()``).

Per-step losses must agree within 1e-5 absolute (|tunesmith - TRL| <= 1e-5) at every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny import save_tiny_model
from tunesmith.config import load_config

trl = pytest.importorskip("trl")

STEPS = 6
LR = 1e-3
N_RECORDS = 8

PAIRS = [
    ("Repeat: sea sky", "sea sky done."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Repeat: wind", "wind done."),
    ("Write a short poem about the sea.", "The sea, the sky and the wind.\nThank you!"),
    ("def add(a, b): what does it return?", "It returns a + b, so add(2, 3) is 5."),
    ("Repeat: poem tool call add print", "poem tool call add print done."),
    ("Call the weather tool for Paris.", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    ("Say hi", "Hi!"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-parity-model"), layers=2, hidden=32)


def conversational(prompt: str, completion: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}]}


def write_data(tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return data


def run_tunesmith(tmp_path: Path, model_dir: Path, batch_size: int, grad_accum: int) -> dict[int, float]:
    from tunesmith.train.recipe import run

    data = write_data(tmp_path)
    out = tmp_path / "tunesmith-run"
    cfg = load_config(None, raw={
        "model": str(model_dir), "method": "sft", "full": True, "lora": None,
        "data": {"train": str(data), "eval_split": 0.0, "max_length": 512, "packing": False,
                 "group_by_length": False},
        "train": {"max_steps": STEPS, "batch_size": batch_size, "grad_accum": grad_accum, "learning_rate": LR,
                  "lr_scheduler": "linear", "warmup_steps": 0, "warmup_ratio": 0.0, "weight_decay": 0.0,
                  "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
                  "seed": 0, "save_steps": 0, "eval_steps": 0, "logging_steps": 1, "dtype": "fp32",
                  "gradient_checkpointing": False, "threads": 1},
        "output_dir": str(out),
    })
    run(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m.get("loss") is not None}


def make_trl_trainer(tmp_path: Path, model_dir: Path, batch_size: int, grad_accum: int):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    captured: list[float] = []

    class RecordingSFTTrainer(SFTTrainer):
        """Records the exact loss of every training micro-batch."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = result[0] if return_outputs else result
                captured.append(float(loss.detach()))
            return result

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl-run"), report_to=[], save_strategy="no", logging_steps=1,
        max_steps=STEPS, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, fp16=False, use_cpu=True, activation_checkpointing=False, seed=0, data_seed=0,
        completion_only_loss=True, assistant_only_loss=False, packing=False, padding_free=False,
        max_length=512, shuffle_dataset=False, dataloader_num_workers=0, eval_strategy="no",
        disable_tqdm=True,
    )
    ds = Dataset.from_list([conversational(p, c) for p, c in PAIRS])
    trainer = RecordingSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    return trainer, tok, captured


@pytest.mark.parametrize("batch_size,grad_accum", [(8, 1), (4, 2)], ids=["8x1", "4x2"])
def test_sft_loss_per_step_matches_trl(tmp_path, model_dir, batch_size, grad_accum):
    from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_record
    from tunesmith.data.validate import load_records

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer, tok, micro = make_trl_trainer(tmp_path, model_dir, batch_size, grad_accum)

        # --- 1. same tokens, same trained (loss-bearing) tokens, record by record
        processed = trainer.train_dataset
        assert len(processed) == N_RECORDS  # nothing dropped or packed
        # what tunesmith's recipe reads from the JSONL: one user + one assistant message each
        records = load_records(write_data(tmp_path), expect={"sft"})
        assert [r["messages"] for r in records] == [
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in PAIRS]
        for i, (record, (p, c)) in enumerate(zip(records, PAIRS)):
            ours = tokenize_record(record, tok, max_length=512)
            theirs = processed[i]
            assert not ours.truncated
            assert ours.input_ids == list(theirs["input_ids"]), (
                f"record {i}: token ids differ\n ours  {tok.decode(ours.input_ids)!r}\n"
                f" TRL's {tok.decode(theirs['input_ids'])!r}")
            our_mask = [int(x != IGNORE_INDEX) for x in ours.labels]
            trl_mask = [int(x != -100) for x in theirs["labels"]]
            assert our_mask == trl_mask, (
                f"record {i}: trained tokens differ\n ours  "
                f"{tok.decode([t for t, m in zip(ours.input_ids, our_mask) if m])!r}\n TRL's "
                f"{tok.decode([t for t, m in zip(ours.input_ids, trl_mask) if m])!r}")
            assert ours.labels == list(theirs["labels"])
            # the trained span is the completion + the template's turn end
            assert tok.decode([t for t, m in zip(ours.input_ids, our_mask) if m]) == c + "<|im_end|>\n"

        # --- 2. train both
        assert not trainer.args.activation_checkpointing
        trainer.train()
        assert not getattr(trainer.model, "is_activation_checkpointing", False)
        ts = run_tunesmith(tmp_path, model_dir, batch_size, grad_accum)
    finally:
        torch.set_num_threads(prev_threads)

    assert len(micro) == STEPS * grad_accum
    trl_losses = [sum(micro[k * grad_accum:(k + 1) * grad_accum]) for k in range(STEPS)]
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):  # the logged loss is the captured one (no rounding at logging_steps=1)
        assert logged[s] == pytest.approx(trl_losses[s - 1], abs=1e-6)
    assert sorted(ts) == list(range(1, STEPS + 1))

    diffs = [abs(ts[s] - trl_losses[s - 1]) for s in range(1, STEPS + 1)]
    table = "\n".join(f"step {s}: tunesmith {ts[s]:.8f}  TRL {trl_losses[s - 1]:.8f}  |diff| {d:.2e}"
                      for s, d in zip(range(1, STEPS + 1), diffs))
    print(table)
    assert trl_losses[-1] < trl_losses[0] - 0.05, table  # training moved: the later steps test the updates too
    assert max(diffs) <= 1e-5, table
