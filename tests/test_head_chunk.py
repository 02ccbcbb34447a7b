"""The LM head and its cross entropy in chunks (models/forward.py ``head_chunk``): the same
log-probabilities and gradients as in one piece, and the memory plan that switches it on."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from test_train_sft import make_cfg, tiny_model_dir  # noqa: F401 (a fixture)
from tiny import make_model, make_tokenizer
from tunesmith.models import forward
from tunesmith.models.forward import HEAD_CHUNK, SequenceLogProbs, TokenLogProbs
from tunesmith.train import memory
from tunesmith.train.recipe import run


def _batch(vocab: int, rows: int = 3, length: int = 17):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 12:] = -100  # rows train different numbers of tokens
    return ids, labels


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_head_equals_one_piece_in_values_and_gradients(lora, monkeypatch):
    checkpointed = []
    real = forward.checkpoint
    monkeypatch.setattr(forward, "checkpoint", lambda fn, *a, **k: checkpointed.append(len(a[1])) or real(fn, *a, **k))
    tok = make_tokenizer()
    model = make_model(tok, seed=3)
    if lora:  # the head itself adapted too, so its chunked backward reaches adapter weights
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                 init_lora_weights=False))
    ids, labels = _batch(len(tok))
    results = []
    for chunk in (None, 5, 7, 1000):
        model.zero_grad()
        logps, counts = SequenceLogProbs(model, head_chunk=chunk)(ids, labels)
        (-logps.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logps.detach(), counts, grads))
    base_logps, base_counts, base_grads = results[0]
    assert base_counts.tolist() == [12, 7, 12] and len(base_grads) > 2
    # 31 trained tokens: chunks of 5 (x6 + 1) and 7 (x4 + 3), each recomputed; 1000 is one piece
    assert checkpointed == [5] * 6 + [1] + [7] * 4 + [3]
    for logps, counts, grads in results[1:]:
        assert torch.equal(counts, base_counts)
        torch.testing.assert_close(logps, base_logps, rtol=0, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, base_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_token_logps_and_no_grad_scoring_agree():
    tok = make_tokenizer()
    model = make_model(tok, seed=4)
    ids, labels = _batch(len(tok))
    whole, mask = TokenLogProbs(model)(ids, labels)
    chunked, mask2 = TokenLogProbs(model, head_chunk=4)(ids, labels)
    assert torch.equal(mask, mask2) and whole[mask].ne(0).all()
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    with torch.no_grad():  # reference and scoring passes: chunks without recomputation
        scored, _ = SequenceLogProbs(model, head_chunk=4)(ids, labels)
    torch.testing.assert_close(scored, whole.sum(1), rtol=0, atol=1e-5)


SIZES = dict(total_params=135_000_000, trainable_params=4_900_000, weight_bytes=4, act_bytes=4, layers=30,
             hidden=576, heads=9, vocab=49_152, batch=8, seq=512)


def test_memory_plan_chunks_the_head_before_it_checkpoints():
    whole = memory.estimate(**SIZES, checkpointing=False)
    chunked = memory.estimate(**SIZES, checkpointing=False, head_chunk=HEAD_CHUNK)
    frugal = memory.estimate(**SIZES, checkpointing=True, head_chunk=HEAD_CHUNK)
    assert frugal.total < chunked.total < whole.total
    assert whole.logits == 3 * 8 * 512 * 49_152 * 4 and chunked.logits == 3 * HEAD_CHUNK * 49_152 * 4

    est, on = memory.plan(checkpointing="auto", limit=whole.total, full=False, **SIZES)
    assert (on, est.head_chunk) == (False, None)  # fits: nothing that costs time
    est, on = memory.plan(checkpointing="auto", limit=whole.total - 1, full=False, **SIZES)
    assert (on, est.head_chunk, est.total) == (False, HEAD_CHUNK, chunked.total)
    est, on = memory.plan(checkpointing="auto", limit=chunked.total - 1, full=False, **SIZES)
    assert (on, est.head_chunk) == (True, HEAD_CHUNK)
    est, on = memory.plan(checkpointing=True, limit=10 * whole.total, full=False, **SIZES)
    assert (on, est.head_chunk) == (True, HEAD_CHUNK)  # asked for frugality: the head is chunked too
    est, on = memory.plan(checkpointing=False, limit=whole.total - 1, full=False, **SIZES)
    assert (on, est.head_chunk) == (False, HEAD_CHUNK)
    small = dict(SIZES, batch=1, seq=512)  # fewer tokens than a chunk: nothing to chunk
    assert memory.estimate(**small, checkpointing=True, head_chunk=HEAD_CHUNK).head_chunk is None


def test_a_run_with_its_head_chunked_trains_like_one_without(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    losses, manifests, chunks = {}, {}, []
    real = forward.head_logps

    def spy(head, hidden, targets, chunk=None):
        chunks.append((chunk, len(hidden)))
        return real(head, hidden, targets, chunk)

    monkeypatch.setattr(forward, "head_logps", spy)
    for name, checkpointing in (("whole", False), ("chunked", True)):
        if checkpointing:  # the tiny model's steps train ~100 tokens: chunks of 16 make several
            monkeypatch.setattr(memory, "HEAD_CHUNK", 16)
            chunks.clear()
        (tmp_path / name).mkdir()
        cfg = make_cfg(tmp_path / name, tiny_model_dir, train__gradient_checkpointing=checkpointing,
                       train__max_steps=4, lora__dropout=0.0)
        manifests[name] = run(cfg)
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in lines if '"loss"' in x and "eval" not in x]
    assert manifests["chunked"]["memory_estimate"]["head_chunk"] == 16
    assert manifests["whole"]["memory_estimate"]["head_chunk"] is None
    assert len(losses["whole"]) == 4
    # the training module itself ran the head in chunks, on steps with more than one chunk
    assert chunks and {c for c, _ in chunks} == {16} and max(n for _, n in chunks) > 16
    assert losses["chunked"] == pytest.approx(losses["whole"], abs=1e-5)


def test_a_frozen_reference_gets_the_plans_chunks(tmp_path, monkeypatch):
    """Full-FT DPO keeps a frozen copy as its reference; its no-grad pass runs while the step's
    gradients and optimizer state are held, so it is chunked as the policy is."""
    from test_train_preference import pref_cfg
    from tiny import save_tiny_model
    from tunesmith.config import load_config

    model_dir = save_tiny_model(tmp_path / "tiny")
    seen = []
    real = forward.head_logps

    def spy(head, hidden, targets, chunk=None):
        seen.append((torch.is_grad_enabled(), chunk))
        return real(head, hidden, targets, chunk)

    monkeypatch.setattr(forward, "head_logps", spy)
    monkeypatch.setattr(memory, "HEAD_CHUNK", 16)
    cfg = pref_cfg(tmp_path, model_dir, "dpo")
    cfg = load_config(None, raw={**cfg.to_dict(), "full": True, "lora": None,
                                 "train": {**cfg.train.model_dump(), "max_steps": 2, "eval_steps": 0,
                                           "gradient_checkpointing": True}})
    run(cfg)
    assert {(False, 16), (True, 16)} <= set(seen) and {c for _, c in seen} == {16}
