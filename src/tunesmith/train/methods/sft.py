"""Supervised fine-tuning: negative log-likelihood of the trained (assistant) tokens.

The loss of one optimizer step is sum(NLL over trained tokens) / trained tokens of the
whole step (the engine does the division), i.e. every trained token weighs the same
whatever micro-batch or process it lands in — what TRL/transformers compute with
``num_items_in_batch``.
"""

from __future__ import annotations

import torch

from tunesmith.data.batches import pack_batch, pack_examples, pad_batch
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.tokenize import Formatting, tokenize_training
from tunesmith.train.methods.base import Method, Split, tokenize_each


def sft_loss(logps: torch.Tensor) -> torch.Tensor:
    """logps (B,): per-sequence sums of log p over trained tokens → summed NLL (scalar)."""
    return -logps.sum()


def prepare(records: list[dict], tokenizer, *, max_length: int, train_on: str, packing: bool, on_overflow: str,
            what: str, special_tokens_in_content: str = "error", chat: ChatOptions = DEFAULT_OPTIONS) -> Split:
    """Records tokenized with the data layer's masking contract (a conversation under a
    history-rewriting template is one sequence per turn); packed when ``packing``."""
    convs, dropped, truncated = tokenize_each(
        records, lambda r: tokenize_training(r, tokenizer, max_length=max_length, train_on=train_on,
                                             on_overflow="drop", special_tokens_in_content=special_tokens_in_content,
                                             chat=chat),
        lambda c: c.examples, what=what, max_length=max_length, on_overflow=on_overflow)
    formatting = Formatting()
    for c in convs:
        formatting.add(c)
    # a conversation that lost a whole turn to max_length (per-turn mode) lost tokens too
    truncated += sum(1 for c in convs if c.dropped_turns and not any(e.truncated for e in c.examples))
    exs = [e for c in convs for e in c.examples]
    if not packing:
        return Split(exs, [len(e.input_ids) for e in exs], dropped, truncated, sum(e.n_trained for e in exs),
                     formatting)
    packs = pack_examples(exs, max_length) if exs else []
    return Split(packs, [sum(len(e.input_ids) for e in p) for p in packs], dropped, truncated,
                 sum(e.n_trained for p in packs for e in p), formatting)


class SFT(Method):
    def __init__(self, pad_id: int, packing: bool = False):
        self.pad_id, self.packing = pad_id, packing

    def collate(self, items: list) -> dict:
        if self.packing:
            batch = pack_batch(items, self.pad_id)
            batch["real_tokens"] = sum(len(ex.input_ids) for pack in items for ex in pack)
            return batch
        return pad_batch(items, self.pad_id)

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, module, batch: dict):
        logps, _ = module(input_ids=batch["input_ids"], labels=batch["labels"],
                          attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        return sft_loss(logps), {}
