"""KTO (Ethayarajh et al. 2024) on unpaired good/bad examples.

Each item is one (prompt, completion, label) example plus a *KL row*: its prompt with
another item's completion, fixed when the data is prepared (``kl_pairs``) so that
reference log-probs can be precomputed and a resumed run sees the same rows. A
micro-batch is 2B rows — the B examples, then their B KL rows — padded together.

The policy runs the B examples with gradients and the KL rows without (z₀ is detached,
as in the paper and TRL); the reference runs all 2B rows in one no-grad forward (or
comes precomputed). z₀ is estimated per micro-batch on each process; TRL averages it
over processes first, which only matters with several processes.

Metrics follow TRL's names: rewards/chosen and logps/chosen average over the desirable
examples only, rewards/rejected and logps/rejected over the undesirable ones ("n:" keys
carry those denominators to the engine), kl is the mean z₀ (clamped at 0, as TRL logs it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunesmith.data.batches import pad_batch
from tunesmith.data.schema import unpair
from tunesmith.data.render import DEFAULT_OPTIONS, ChatOptions
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedExample, UnpairedExample, tokenize_unpaired
from tunesmith.errors import TunesmithError
from tunesmith.train.methods.base import Method, Split, tokenize_each
from tunesmith.train.methods.losses import kto_kl_estimate, kto_loss
from tunesmith.train.methods.reference import Reference, unwrap


@dataclass
class KTOItem:
    example: UnpairedExample
    kl: TokenizedExample  # this example's prompt + another example's completion


def kl_pairs(examples: list[UnpairedExample], max_length: int | None, seed: int) -> list[KTOItem]:
    """Pair every example's prompt with the completion of the next example in a seeded
    shuffle (a cycle, so no example is its own partner; TRL shifts completions by one
    within a batch). Paired data unpaired into consecutive chosen/rejected records would
    otherwise get its own prompt's other answer. KL rows longer than ``max_length`` lose
    completion tokens from the right."""
    n = len(examples)
    if n < 2:
        raise TunesmithError("KTO needs at least 2 examples: its KL estimate pairs each prompt with "
                             "another example's completion; add data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    items = []
    partner = {order[k]: order[(k + 1) % n] for k in range(n)}
    for i, ex in enumerate(examples):
        other = examples[partner[i]]
        p = ex.completion.input_ids[:ex.prompt_len]
        ids = p + other.completion.input_ids[other.prompt_len:]
        labels = [IGNORE_INDEX] * len(p) + other.completion.labels[other.prompt_len:]
        if max_length and len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(lab != IGNORE_INDEX for lab in labels[1:])
        items.append(KTOItem(ex, TokenizedExample(ids, labels, len(ids), trained, trained, False)))
    return items


def prepare(records: list[dict], tokenizer, *, max_length: int, on_overflow: str, what: str, seed: int,
            special_tokens_in_content: str = "error", chat: ChatOptions = DEFAULT_OPTIONS) -> Split:
    """Unpaired examples, each with its KL row (``kl_pairs``); paired records train KTO as
    two unpaired examples. The KL row runs without gradients, so only the example trains."""
    unpaired = [u for r in records for u in unpair(r)]
    exs, dropped, truncated = tokenize_each(
        unpaired, lambda r: tokenize_unpaired(r, tokenizer, max_length=max_length, on_overflow="drop",
                                              special_tokens_in_content=special_tokens_in_content, chat=chat),
        lambda u: [u.completion], what=what, max_length=max_length, on_overflow=on_overflow)
    items = kl_pairs(exs, max_length, seed) if exs else []
    return Split(items, [len(it.example.completion.input_ids) + len(it.kl.input_ids) for it in items], dropped,
                 truncated, sum(it.example.completion.n_trained for it in items))


class KTO(Method):
    def __init__(self, pad_id: int, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference: Reference | None = None):
        self.pad_id, self.beta = pad_id, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.reference = reference or Reference()  # default: the policy with its adapter disabled

    def collate(self, items: list) -> dict:
        items, ref = unwrap(items)
        batch = pad_batch([it.example.completion for it in items] + [it.kl for it in items], self.pad_id)
        batch["n"] = len(items)
        batch["desirable"] = torch.tensor([it.example.desirable for it in items], dtype=torch.bool)
        batch["ref_logps"] = ref
        return batch

    def units(self, batch: dict) -> int:
        return int(batch["n"])

    def trained_tokens(self, batch: dict) -> int:
        """The examples' completion tokens; the KL rows run without gradients."""
        return int((batch["labels"][: batch["n"], 1:] != -100).sum())

    @staticmethod
    def inputs(batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}

    def loss(self, module, batch: dict):
        n, desirable = batch["n"], batch["desirable"]
        inputs = self.inputs(batch)
        logps, _ = module(**{k: v[:n] for k, v in inputs.items()})
        with torch.no_grad():
            inner = getattr(module, "module", module)  # no DDP hooks for a no-grad forward
            kl_logps, _ = inner(**{k: v[n:] for k, v in inputs.items()})
        ref = self.reference(module, batch, inputs)
        kl = kto_kl_estimate(kl_logps, ref[n:])
        losses, rewards = kto_loss(logps, ref[:n], desirable, kl, beta=self.beta,
                                   desirable_weight=self.desirable_weight,
                                   undesirable_weight=self.undesirable_weight)
        undesirable = ~desirable
        pol = logps.detach()
        metrics = {
            "rewards/chosen": rewards[desirable].sum(), "n:rewards/chosen": desirable.sum(),
            "rewards/rejected": rewards[undesirable].sum(), "n:rewards/rejected": undesirable.sum(),
            "logps/chosen": pol[desirable].sum(), "n:logps/chosen": desirable.sum(),
            "logps/rejected": pol[undesirable].sum(), "n:logps/rejected": undesirable.sum(),
            "kl": kl * n,
        }
        return losses.sum(), metrics
