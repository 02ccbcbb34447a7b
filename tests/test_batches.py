"""Padding, length grouping and packing (data/batches.py), checked against unpacked runs."""

import random

import pytest
import torch
from tiny import make_model, make_tokenizer

from tunesmith.data.batches import (
    block_causal_mask,
    length_grouped_order,
    pack_batch,
    pack_examples,
    packing_efficiency,
    pad_batch,
)
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_record
from tunesmith.errors import TunesmithError


def ex(n: int, start: int = 10) -> TokenizedExample:
    ids = list(range(start, start + n))
    return TokenizedExample(ids, [IGNORE_INDEX] + ids[1:], n, n - 1, n - 1, False)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


@pytest.fixture(scope="module")
def records(tok):
    """Chat records (assistant-only labels) and text records (all tokens train), 9-40 tokens."""
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("Hi", "Hello!"), ("What is 2+2?", "4"), ("Name a sea.", "The North Sea, near the coast.")]
    ]
    out = [tokenize_record({"messages": m}, tok) for m in chats]
    out += [tokenize_record({"text": t}, tok) for t in ("the quick brown fox", "hello world " * 5, "a b")]
    return out


def test_pad_batch(tok):
    batch = pad_batch([ex(3), ex(5)], pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 11, 12] + [IGNORE_INDEX] * 5
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]


def test_length_grouped_order_is_a_deterministic_permutation_that_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    order = length_grouped_order(lengths, batch_size=8, seed=1)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=8, seed=1)
    assert order != length_grouped_order(lengths, batch_size=8, seed=2)
    assert lengths[order[0]] == max(lengths)  # the biggest batch runs first

    def efficiency(perm):
        return packing_efficiency([[lengths[i] for i in perm[k : k + 8]] for k in range(0, len(perm), 8)])

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    # random order wastes ~40% on padding (uniform 5-500, batches of 8); grouped ~1-2%
    assert efficiency(shuffled) < 0.7 and efficiency(order) > 0.95


def test_pack_examples_uses_every_example_once_and_fits():
    rng = random.Random(0)
    examples = [ex(rng.randint(5, 200)) for _ in range(300)]
    packs = pack_examples(examples, max_length=512)
    assert sorted(id(e) for p in packs for e in p) == sorted(id(e) for e in examples)
    assert all(sum(len(e.input_ids) for e in p) <= 512 for p in packs)
    assert packing_efficiency([[sum(len(e.input_ids) for e in p)] for p in packs], pad_to=512) > 0.95
    with pytest.raises(TunesmithError, match="cannot be packed"):
        pack_examples([ex(600)], max_length=512)


def test_block_causal_mask_matches_a_loop_reference():
    seq = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(seq)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    for b in range(2):
        for q in range(6):
            for k in range(6):
                ok = (seq[b, q] == seq[b, k] and seq[b, q] > 0 and k <= q) or (seq[b, q] == 0 and q == k)
                assert mask[b, 0, q, k].item() == (0.0 if ok else torch.finfo(torch.float32).min)


def test_pack_batch_positions_and_boundary_labels():
    batch = pack_batch([[ex(3), ex(2, start=50)], [ex(4)]], pad_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].shape == (2, 1, 5, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # the first token of each record is never a target: the previous record must not predict it
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 11, 12, IGNORE_INDEX, 51], [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(tok, records, attn):
    model = make_model(tok, attn_implementation=attn)
    packs = pack_examples(records, max_length=128)
    assert len(packs) > 1 and any(len(p) > 1 for p in packs)
    batch = pack_batch(packs, pad_id=tok.pad_token_id)
    assert (batch["attention_mask"].shape[-1] > torch.tensor([sum(len(e.input_ids) for e in p) for p in packs])).any()
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        loss_sum, n_targets = 0.0, 0
        for b, pack in enumerate(packs):
            t = 0
            for e in pack:
                n = len(e.input_ids)
                ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
                alone = model(input_ids=ids, labels=labels, use_cache=False)
                torch.testing.assert_close(packed.logits[b, t : t + n], alone.logits[0], atol=1e-5, rtol=0)
                k = int((labels[0, 1:] != IGNORE_INDEX).sum())  # targets after the loss's shift
                loss_sum, n_targets = loss_sum + alone.loss.item() * k, n_targets + k
                t += n
    torch.testing.assert_close(packed.loss.item(), loss_sum / n_targets, atol=1e-5, rtol=1e-6)


def test_packed_mask_in_bf16(tok, records):
    model = make_model(tok).to(torch.bfloat16)
    batch = pack_batch(pack_examples(records, max_length=128), pad_id=tok.pad_token_id, dtype=torch.bfloat16)
    assert batch["attention_mask"].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(**batch, use_cache=False).loss)


def test_packing_efficiency():
    assert packing_efficiency([[3, 5], [4]]) == pytest.approx(12 / 14)
    assert packing_efficiency([[3, 5]], pad_to=10) == pytest.approx(8 / 20)
    assert packing_efficiency([]) == 0.0
