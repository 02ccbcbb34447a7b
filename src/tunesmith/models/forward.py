"""The forwards every method trains and scores through: per-sequence log-probabilities of
the trained tokens (``SequenceLogProbs``), per token (``TokenLogProbs``, GRPO), and a reward
model's score per sequence (``SequenceScores``).

Why our own head call instead of ``model(..., labels=...)``: the LM head of a small model
is a large share of its compute (SmolLM2-135M: 576 x 49,152 = 28M of 134.5M parameters,
~21% of forward FLOPs) and its logits dominate memory (b*s*V fp32). Running the head only
on the positions that carry a label (response tokens) saves both, and returning per-row
sums serves SFT (sum of NLL), the DPO family (sequence log-probs) and KTO alike.

The wrapper is an ``nn.Module`` so DDP can wrap it: DDP's gradient hooks fire only when
the forward goes through the wrapped module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _unwrap_peft(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SequenceLogProbs(nn.Module):
    """forward(input_ids (B,T), labels (B,T), attention_mask (B,T) or (B,1,T,T), position_ids?)
    → (logps (B,) fp32 sum of log p(label_t | <t) over trained tokens, counts (B,) int).

    Labels follow the data layer's contract: position t's label is the token at t (not
    shifted); -100 = no loss. Position t-1's hidden state predicts label t.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a transformers causal LM, possibly a PeftModel

    def token_logps(self, input_ids, labels, attention_mask=None, position_ids=None):
        """(log p of each trained token (N,), its row (N,), mask (B, T-1)) — the LM head runs
        on the N trained positions only."""
        lm = _unwrap_peft(self.model)
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != -100                                   # (B, T-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
        selected = hidden[:, :-1][mask]                          # (N, H), N = trained tokens
        logits = lm.get_output_embeddings()(selected).float()    # (N, V) in fp32 for a stable softmax
        return -F.cross_entropy(logits, targets[mask], reduction="none"), rows, mask

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        token_logps, rows, mask = self.token_logps(input_ids, labels, attention_mask, position_ids)
        logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        return logps.index_add(0, rows, token_logps), mask.sum(dim=1)


class TokenLogProbs(SequenceLogProbs):
    """forward(...) → (log p per position (B, T-1) fp32, 0 where no label; mask (B, T-1)):
    per-token values for GRPO's token-level ratio and KL."""

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        token_logps, _, mask = self.token_logps(input_ids, labels, attention_mask, position_ids)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=input_ids.device)
        out[mask] = token_logps
        return out, mask


class SequenceScores(nn.Module):
    """forward(input_ids (B,T), attention_mask (B,T)) → (B,) fp32 score at each row's last
    real token. An ``nn.Module`` so DDP can wrap it (as ``SequenceLogProbs``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # AutoModelForSequenceClassification, possibly a PeftModel

    def forward(self, input_ids, attention_mask, **_):
        clf = _unwrap_peft(self.model)
        hidden = clf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(dim=1) - 1                        # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return clf.score(pooled).squeeze(-1).float()
