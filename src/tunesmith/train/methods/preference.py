"""The DPO family on paired data (DPO sigmoid/cDPO, robust, hinge, IPO, SimPO, ORPO).

One batch holds B pairs as 2B rows — chosen rows first, then rejected — padded together,
so the policy (and the reference) run one forward per micro-batch. The loss of a step is
sum over pairs / pairs of the whole step (the engine divides by ``units``).

Reference log-probs: with an adapter, the same model with the adapter disabled (no second
copy in memory); with full fine-tuning, a frozen copy given as ``ref_model``; none for the
reference-free losses (SimPO, ORPO).
"""

from __future__ import annotations

import torch

from tunesmith.data.batches import pad_batch
from tunesmith.train.methods.losses import (LENGTH_NORMALISED, PAIRWISE_LOSSES, REFERENCE_FREE, nll_from_logps,
                                            reward_metrics)


def _inner(module):
    """The SequenceLogProbs wrapper under DDP (``.module``) or as is."""
    return getattr(module, "module", module)


class Preference:
    def __init__(self, pad_id: int, *, loss_type: str, beta: float, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, sft_weight: float = 0.0, ref_model=None):
        self.pad_id, self.loss_type, self.beta = pad_id, loss_type, beta
        self.label_smoothing, self.simpo_gamma, self.sft_weight = label_smoothing, simpo_gamma, sft_weight
        self.ref_model = ref_model  # a SequenceLogProbs over a frozen model, or None (adapter-disabled)
        self.loss_fn = PAIRWISE_LOSSES[loss_type]

    def collate(self, items: list) -> dict:
        batch = pad_batch([p.chosen for p in items] + [p.rejected for p in items], self.pad_id)
        batch["n_pairs"] = len(items)
        return batch

    @staticmethod
    def units(batch: dict) -> int:
        return int(batch["n_pairs"])

    def _reference(self, module, inputs: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self.ref_model(**inputs)[0]
            inner = _inner(module)
            with inner.model.disable_adapter():
                return inner(**inputs)[0]

    def loss(self, module, batch: dict):
        inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
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
            ref = self._reference(module, inputs)
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
