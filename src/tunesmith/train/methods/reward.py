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
from torch import nn

from tunesmith.data.batches import pad_batch
from tunesmith.train.methods.losses import bradley_terry_loss


def _classifier(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SequenceScores(nn.Module):
    """forward(input_ids (B,T), attention_mask (B,T)) → (B,) fp32 score at each row's last
    real token. An ``nn.Module`` so DDP can wrap it (as ``forward.SequenceLogProbs``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # AutoModelForSequenceClassification, possibly a PeftModel

    def forward(self, input_ids, attention_mask, **_):
        clf = _classifier(self.model)
        hidden = clf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(dim=1) - 1                        # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return clf.score(pooled).squeeze(-1).float()


class Reward:
    wrap = SequenceScores

    def __init__(self, pad_id: int, *, margin: float = 0.0, center_coefficient: float = 0.0):
        self.pad_id, self.margin, self.center_coefficient = pad_id, margin, center_coefficient

    def collate(self, items: list) -> dict:
        batch = pad_batch([p.chosen for p in items] + [p.rejected for p in items], self.pad_id)
        batch["n_pairs"] = len(items)
        return batch

    @staticmethod
    def units(batch: dict) -> int:
        return int(batch["n_pairs"])

    def loss(self, module, batch: dict):
        n = batch["n_pairs"]
        scores = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        chosen, rejected = scores[:n], scores[n:]
        losses = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coefficient=self.center_coefficient)
        c, r = chosen.detach(), rejected.detach()
        return losses.sum(), {"accuracy": (c > r).float().sum(), "margin": (c - r).sum(),
                              "rewards/chosen": c.sum(), "rewards/rejected": r.sum()}


def score_conversations(model, tokenizer, prompts: list[list[dict]], completions: list[str], *,
                        max_length: int | None = None, batch_size: int = 8) -> list[float]:
    """Scores of ``completions`` (assistant text) after their prompt conversations, with the
    tokenizer's chat template and the same truncation as training (prompt cut from the
    left first); nan where nothing of the completion fits."""
    from tunesmith.data.tokenize import tokenize_unpaired

    exs = [tokenize_unpaired({"prompt": p, "completion": [{"role": "assistant", "content": c}], "label": True},
                             tokenizer, max_length=max_length, on_overflow="drop") for p, c in zip(prompts, completions)]
    scorer = SequenceScores(model)
    device = next(model.parameters()).device
    out = [float("nan")] * len(exs)
    kept = [i for i, e in enumerate(exs) if e is not None]
    with torch.no_grad():
        for start in range(0, len(kept), batch_size):
            idx = kept[start:start + batch_size]
            batch = pad_batch([exs[i].completion for i in idx], tokenizer.pad_token_id)
            scores = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for i, s in zip(idx, scores.tolist()):
                out[i] = s
    return out
