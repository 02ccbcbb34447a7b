"""The contract between a training method and the engine: every member the engine calls.

A method is a small object built by its registry row (``registry.py``) with plain keyword
arguments — including its reference, when it has one — and asked, per optimizer step:

    batch = method.rollout(method.collate(items), step)   # per micro-batch, before any backward
    units = method.units(batch)                           # what the step's loss is divided by
    loss_sum, metric_sums = method.loss(module, batch)    # module = method.wrap(model), maybe DDP

Why a base class with defaults rather than a bare ``Protocol``: the engine then calls
every member unconditionally (no ``hasattr`` probing), and a method overrides only what
it changes. There is one level of it; methods do not inherit from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import TunesmithError
from tunesmith.models.forward import SequenceLogProbs


class Method:
    # The forward the engine trains through: (B, T) ids → what ``loss`` reads.
    # Default: per-sequence log-probs of the trained tokens (models.forward). Called as
    # wrap(model, head_chunk=N or None): the memory plan's LM-head chunk size.
    wrap: type[torch.nn.Module] = SequenceLogProbs

    def collate(self, items: list) -> dict:
        """A micro-batch of prepared items → tensors (built on CPU; the engine moves them)."""
        raise NotImplementedError

    def rollout(self, batch: dict, step: int | None) -> dict:
        """Online methods sample and score here (GRPO); offline ones return ``batch``.

        Called on every micro-batch of a training step before the first backward, so all
        samples of a step come from the same policy; ``step`` is the optimizer step being
        built (1-based), None for evaluation batches."""
        return batch

    def units(self, batch: dict) -> int:
        """What the step's summed loss is divided by: trained tokens, pairs, examples…"""
        raise NotImplementedError

    def loss(self, module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, {metric: sum over units}); an ``n:NAME`` entry is NAME's own denominator."""
        raise NotImplementedError

    def trained_tokens(self, batch: dict) -> int:
        """Tokens that receive a gradient (for trained tokens/s): every labelled position."""
        labels = batch.get("labels")
        return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels is not None else 0


# ---------------------------------------------------------------- data preparation


@dataclass
class Split:
    """One split (train or eval) prepared for a method."""

    items: list  # what ``collate`` receives
    lengths: list[int]  # tokens per item, for length grouping
    dropped: int = 0  # records whose trained tokens would all be truncated (on_overflow: drop)
    truncated: int = 0  # records that lost tokens but kept some trained ones
    trained: int = 0  # tokens that receive a gradient over one epoch
    formatting: Any = None  # data.tokenize.Formatting of SFT conversations (append or per-turn), else None


def tokenize_each(records: list[dict], tokenize: Callable[[dict], Any], sequences: Callable[[Any], list], *,
                  what: str, max_length: int, on_overflow: str) -> tuple[list, int, int]:
    """``tokenize(record)`` on every record, where None means every trained token would be
    cut at ``max_length``: refused with ``on_overflow: error``, dropped with ``drop``.
    Returns (examples, dropped, truncated); ``sequences(example)`` lists the tokenized
    sequences of one example (a pair has two), to count truncation."""
    out, dropped, truncated = [], 0, 0
    for i, r in enumerate(records):
        ex = tokenize(r)
        if ex is None:
            if on_overflow == "error":
                raise TunesmithError(
                    f"{what} record {i} would lose every trained token at data.max_length={max_length}; "
                    f"raise data.max_length or set data.on_overflow: drop (`tunesmith data check` lists them all)")
            dropped += 1
            continue
        truncated += any(x.truncated for x in sequences(ex))
        out.append(ex)
    return out, dropped, truncated
