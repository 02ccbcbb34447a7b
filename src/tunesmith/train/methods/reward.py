"""Reward model: one scalar per sequence from a causal LM with a classification head,
trained on preference pairs with the Bradley-Terry loss (``losses.bradley_terry_loss``).

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (so the saved
folder loads with transformers alone); LoRA adds the head to the trained modules. The
score of a sequence is the head's output at its last real token, found from the
attention mask rather than from ``pad_token_id`` (SmolLM2 pads with a token that also
ends every turn, which would confuse transformers' own pooling).
"""

from __future__ import annotations

import torch
from tunesmith.data.batches import pad_batch
from tunesmith.models.forward import SequenceScores
from tunesmith.train.methods.base import Method
from tunesmith.train.methods.losses import bradley_terry_loss


class Reward(Method):
    wrap = SequenceScores

    def __init__(self, pad_id: int, *, margin: float = 0.0, center_coefficient: float = 0.0):
        self.pad_id, self.margin, self.center_coefficient = pad_id, margin, center_coefficient

    def collate(self, items: list) -> dict:
        batch = pad_batch([p.chosen for p in items] + [p.rejected for p in items], self.pad_id)
        batch["n_pairs"] = len(items)
        return batch

    def units(self, batch: dict) -> int:
        return int(batch["n_pairs"])

    def loss(self, module, batch: dict):
        n = batch["n_pairs"]
        scores = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen, rejected = scores[:n], scores[n:]
        losses = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coefficient=self.center_coefficient)
        c, r = chosen.detach(), rejected.detach()
        return losses.sum(), {"accuracy": (c > r).float().sum(), "margin": (c - r).sum(),
                              "rewards/chosen": c.sum(), "rewards/rejected": r.sum()}
