"""The DPO family on paired data (DPO sigmoid/cDPO, robust, hinge, IPO, SimPO, ORPO).

One batch holds B pairs as 2B rows — chosen rows first, then rejected — padded together,
so the policy (and the reference) run one forward per micro-batch. The loss of a step is
sum over pairs / pairs of the whole step (the engine divides by ``units``).

Reference log-probs (``reference.Reference``): with an adapter, the same model with the
adapter disabled (no second copy in memory); with full fine-tuning, a frozen copy or a
``preference.ref_model``; precomputed values carried by the items; none for the
reference-free losses (SimPO, ORPO).
"""

from __future__ import annotations

from tunesmith.data.batches import pad_batch
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.tokenize import tokenize_preference
from tunesmith.train.methods.base import Method, Split, tokenize_each
from tunesmith.train.methods.losses import (LENGTH_NORMALISED, PAIRWISE_LOSSES, REFERENCE_FREE, nll_from_logps,
                                            reward_metrics)
from tunesmith.train.methods.reference import Reference, unwrap


def prepare_pairs(records: list[dict], tokenizer, *, max_length: int, on_overflow: str, what: str,
                  special_tokens_in_content: str = "error", chat: ChatOptions = DEFAULT_OPTIONS) -> Split:
    """Preference records as (chosen, rejected) pairs sharing their prompt tokens (also the
    reward model's data)."""
    pairs, dropped, truncated = tokenize_each(
        records, lambda r: tokenize_preference(r, tokenizer, max_length=max_length, on_overflow="drop",
                                               special_tokens_in_content=special_tokens_in_content, chat=chat),
        lambda p: [p.chosen, p.rejected], what=what, max_length=max_length, on_overflow=on_overflow)
    return Split(pairs, [len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs], dropped, truncated,
                 sum(p.chosen.n_trained + p.rejected.n_trained for p in pairs))


class Preference(Method):
    def __init__(self, pad_id: int, *, loss_type: str, beta: float, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, sft_weight: float = 0.0, reference: Reference | None = None):
        self.pad_id, self.loss_type, self.beta = pad_id, loss_type, beta
        self.label_smoothing, self.simpo_gamma, self.sft_weight = label_smoothing, simpo_gamma, sft_weight
        self.reference = reference or Reference()  # default: the policy with its adapter disabled
        self.loss_fn = PAIRWISE_LOSSES[loss_type]

    def collate(self, items: list) -> dict:
        items, ref = unwrap(items)
        batch = pad_batch([p.chosen for p in items] + [p.rejected for p in items], self.pad_id)
        batch["n_pairs"] = len(items)
        batch["ref_logps"] = ref
        return batch

    def units(self, batch: dict) -> int:
        return int(batch["n_pairs"])

    @staticmethod
    def inputs(batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}

    def loss(self, module, batch: dict):
        inputs = self.inputs(batch)
        n = batch["n_pairs"]
        logps, counts = module(**inputs)
        avg = logps / counts.clamp(min=1)
        use = avg if self.loss_type in LENGTH_NORMALISED else logps
        kw = {"beta": self.beta}
        if self.loss_type in ("sigmoid", "robust", "simpo"):
            kw["label_smoothing"] = self.label_smoothing
        if self.loss_type == "simpo":
            kw["gamma"] = self.simpo_gamma
        if self.loss_type in REFERENCE_FREE:
            losses, r_c, r_r = self.loss_fn(use[:n], use[n:], **kw)
        else:
            ref = self.reference(module, batch, inputs)
            ref_use = ref / counts.clamp(min=1) if self.loss_type in LENGTH_NORMALISED else ref
            losses, r_c, r_r = self.loss_fn(use[:n], use[n:], ref_use[:n], ref_use[n:], **kw)
        total = losses.sum()
        nll = nll_from_logps(logps[:n], counts[:n])
        if self.loss_type == "orpo":
            total = total + nll.sum()  # ORPO eq. 6: NLL(chosen) + λ L_OR
        if self.sft_weight > 0:
            total = total + self.sft_weight * nll.sum()
        metrics = reward_metrics(r_c, r_r)
        metrics["logps/chosen"] = logps[:n].detach().sum()
        metrics["logps/rejected"] = logps[n:].detach().sum()
        metrics["nll/chosen"] = nll.detach().sum()
        return total, metrics
