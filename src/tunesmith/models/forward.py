"""The forwards every method trains and scores through: per-sequence log-probabilities of
the trained tokens (``SequenceLogProbs``), per token (``TokenLogProbs``, GRPO), and a reward
model's score per sequence (``SequenceScores``).

Why our own head call instead of ``model(..., labels=...)``: the LM head of a small model
is a large share of its compute (SmolLM2-135M: 576 x 49,152 = 28M of 134.5M parameters,
~21% of forward FLOPs) and its logits dominate memory (b*s*V fp32). Running the head only
on the positions that carry a label (response tokens) saves both, and returning per-row
sums serves SFT (sum of NLL), the DPO family (sequence log-probs) and KTO alike.

Where a run's memory plan asks (``head_chunk``), the head and its loss run ``HEAD_CHUNK``
trained tokens at a time, each chunk under activation checkpointing (``head_logps``), so at
most one chunk's (n, V) logits exist at once, in the forward and in the backward.

The wrapper is an ``nn.Module`` so DDP can wrap it: DDP's gradient hooks fire only when
the forward goes through the wrapped module.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Trained tokens the LM head and its cross entropy see at once when a run's memory plan chunks
# them (train/memory.py: when the step would not fit otherwise, and whenever gradient
# checkpointing is on, since the logits are then most of what a step holds). Unchunked, N trained
# tokens hold three (N, V) fp32 buffers (logits, log-softmax, their gradient): at V = 49,152 and
# 8 x 512 tokens three quarters trained, 3 x 0.6 GB. Chunked, each chunk's logits are recomputed
# in the backward (one more (n, H) x (H, V) product per chunk, ~4% of a SmolLM2 LoRA step's
# FLOPs). Measured through
# `tunesmith train` (SmolLM2, LoRA r=8, fp32, batch 8 x 512, 3 steps, per-step losses identical):
# peak RSS 12.92 → 11.93 GiB, 82 → 75 tokens/s; with gradient checkpointing 9.86 → 6.50 GiB.
# So it is a memory lever, not on by default (bench/README.md, "Speed close to the hardware").
HEAD_CHUNK = 1024


def _unwrap_peft(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()                                 # (n, V) in fp32 for a stable softmax
    return -F.cross_entropy(logits, targets, reduction="none")


def head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """log p(target) of each row of ``hidden`` (N, H) under ``head``: in one piece, or with
    ``chunk`` set, ``chunk`` rows at a time with each chunk's logits recomputed in the backward."""
    n = hidden.shape[0]
    if chunk is None or n <= chunk:
        return _chunk_logps(head, hidden, targets)
    # scoring and reference passes (no grad): nothing to recompute
    run = partial(checkpoint, _chunk_logps, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logps
    return torch.cat([run(head, hidden[i:i + chunk], targets[i:i + chunk]) for i in range(0, n, chunk)])


class SequenceLogProbs(nn.Module):
    """forward(input_ids (B,T), labels (B,T), attention_mask (B,T) or (B,1,T,T), position_ids?)
    → (logps (B,) fp32 sum of log p(label_t | <t) over trained tokens, counts (B,) int).

    Labels follow the data layer's contract: position t's label is the token at t (not
    shifted); -100 = no loss. Position t-1's hidden state predicts label t.
    """

    def __init__(self, model: nn.Module, head_chunk: int | None = None):
        super().__init__()
        self.model = model  # a transformers causal LM, possibly a PeftModel
        self.head_chunk = head_chunk  # trained tokens per LM-head chunk; None = all at once

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
        return head_logps(lm.get_output_embeddings(), selected, targets[mask], self.head_chunk), rows, mask

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

    def __init__(self, model: nn.Module, head_chunk: int | None = None):
        super().__init__()
        self.model = model  # AutoModelForSequenceClassification, possibly a PeftModel
        del head_chunk  # a one-scalar head has no vocabulary-sized logits to chunk

    def forward(self, input_ids, attention_mask, **_):
        clf = _unwrap_peft(self.model)
        hidden = clf.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(dim=1) - 1                        # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return clf.score(pooled).squeeze(-1).float()
