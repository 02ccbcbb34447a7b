"""Several models for one evaluation, with each set of base weights in memory once.

    pool = ModelPool(["smollm2-135m-instruct", "runs/sft-a", "runs/sft-b", "runs/dpo-on-sft-a"])
    for member in pool.load_order():
        with pool.use(member) as model:
            generate(model, member.tokenizer, prompts)

Why: comparing a base with three LoRA runs on it would otherwise hold four copies of the
base (SmolLM2-135M in fp32: 4 x 540 MB, and four loads). Members are grouped by ``key``,
the weights their adapter sits on (``infer.load.resolve``), spelled the way
``models.runs.trained_base`` builds them:

- a base model, a plain adapter run, an adapter folder or an adapter export: the base folder;
- a run started from another run's adapter (DPO on top of SFT): the base + that chain of
  merged adapters — numerically another model, so it gets its own copy;
- a full fine-tuning run or a merged export: its own folder;
- a reward model (``method: reward``): its own folder, loaded with ``load_scorer``;

plus the tokenizer's length (a run that added tokens needs resized embeddings). In a
group, the first adapter is attached with ``PeftModel.from_pretrained``, the others with
``load_adapter``, each under its own name, and ``set_adapter`` picks one; the plain base
runs under ``disable_adapter()``. Groups load one at a time; the previous one is dropped.

Every spec is resolved (manifest, tokenizer with the chat template recorded at training)
when the pool is built, so a wrong spec fails before any weights load. Specs mean what
they mean for ``infer.load_for_inference``.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from tunesmith.errors import TunesmithError
from tunesmith.infer.load import Resolved, build_weights, load_weights, remote_code, resolve
from tunesmith.models.runs import trained_base


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    labels = []
    for s in names:
        seen[s] = seen.get(s, 0) + 1
        labels.append(s if seen[s] == 1 else f"{s} ({seen[s]})")
    return labels


@dataclass
class ModelPool:
    """The members of one evaluation and the one group of weights currently in memory."""

    specs: list  # str specs, or (base, adapter folder) pairs
    labels: list[str] | None = None  # names for tables; default: the specs as given ("BASE+ADAPTER" for pairs)
    members: list[Resolved] = field(init=False)
    loads: int = field(init=False, default=0)  # groups loaded so far (tests check the sharing)

    def __post_init__(self):
        if not self.specs:
            raise TunesmithError("no model to evaluate; give at least one run folder, export or base model")
        if self.labels is not None and len(self.labels) != len(self.specs):
            raise TunesmithError(f"{len(self.labels)} labels for {len(self.specs)} models; give one label per model")
        labels = _unique([x if isinstance(x, str) else "+".join(map(str, x)) for x in (self.labels or self.specs)])
        self.members = [resolve(s, label) for s, label in zip(self.specs, labels)]
        self._key: tuple | None = None
        self._model = None
        self._names: dict[str, str] = {}

    def load_order(self) -> list[Resolved]:
        """Members grouped by key (in order of first appearance), so each group loads once."""
        first = {}
        for i, m in enumerate(self.members):
            first.setdefault(m.key, i)
        return sorted(self.members, key=lambda m: first[m.key])

    def groups(self) -> list[list[str]]:
        """Labels that share weights, one list per group."""
        out: dict[tuple, list[str]] = {}
        for m in self.load_order():
            out.setdefault(m.key, []).append(m.label)
        return list(out.values())

    def _activate(self, key: tuple):
        if self._key == key:
            return self._model
        self._model, self._key, self._names = None, None, {}
        gc.collect()
        group = [m for m in self.members if m.key == key]
        model = build_weights(group[0])
        self.loads += 1
        for m in (m for m in group if m.adapter is not None):
            name = self._names[m.label] = f"m{len(self._names)}"  # PEFT names are module keys: no dots
            if len(self._names) == 1:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, m.adapter, adapter_name=name)
            else:
                model.load_adapter(m.adapter, adapter_name=name)
        self._model, self._key = model.eval(), key
        return self._model

    @contextmanager
    def use(self, member: Resolved) -> Iterator[Any]:
        """The member's model: its group's weights with its own adapter on (or none)."""
        from peft import PeftModel

        model = self._activate(member.key)
        if member.adapter is not None:
            model.set_adapter(self._names[member.label])
            yield model
        elif isinstance(model, PeftModel):  # the plain base of a group that holds adapters
            with model.disable_adapter():
                yield model
        else:
            yield model

    @staticmethod
    def has_reference(member: Resolved) -> bool:
        """Whether ``reference`` can give the model this one was trained from."""
        return member.adapter is not None or member.run is not None

    @contextmanager
    def reference(self, member: Resolved) -> Iterator[Any]:
        """The model ``member`` was trained from, as DPO's reference: ``preference.ref_model``
        when the run named one; else the adapter switched off (the run's trained base, no
        second copy); else, for full fine-tuning, ``trained_base`` loaded beside it."""
        ref_name = ((member.run.config.get("preference") or {}).get("ref_model")) if member.run else None
        if ref_name:
            yield load_weights(ref_name, trust_remote_code=remote_code(member.run))
        elif member.adapter is not None:
            model = self._activate(member.key)
            with model.disable_adapter():
                yield model
        elif member.run is not None:
            yield trained_base(member.run, torch.float32).eval()
        else:
            raise TunesmithError(f"{member.label} records no model it was trained from; evaluate the run folder")
