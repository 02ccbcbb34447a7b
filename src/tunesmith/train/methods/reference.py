"""Reference log-probs for the DPO family and KTO: three sources behind one call.

- adapter-disabled: the policy with its LoRA adapter switched off (no second copy in memory);
- a frozen model: full fine-tuning's copy of the starting weights, or ``preference.ref_model``;
- precomputed (``preference.precompute_ref``): computed once before training, stored in the
  run folder (``reference_logps.safetensors``) and carried by each item, so no reference
  forward runs during training and a frozen copy need not stay in memory.

Every method with a reference lays out a micro-batch as 2B rows where item i owns rows i
and B+i (DPO family: chosen, rejected; KTO: completion, KL completion), so one storage
layout, (N, 2) per split, serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REF_FILE = "reference_logps.safetensors"


@dataclass
class WithRef:
    """A training/eval item with its precomputed reference log-probs (row i, row B+i)."""
    item: Any
    ref: tuple[float, float]


def unwrap(items: list) -> tuple[list, torch.Tensor | None]:
    """(bare items, (2B,) reference log-probs in row order or None)."""
    if not items or not isinstance(items[0], WithRef):
        return items, None
    refs = [x.ref[0] for x in items] + [x.ref[1] for x in items]
    return [x.item for x in items], torch.tensor(refs, dtype=torch.float32)


class Reference:
    """``ref(module, batch, inputs) -> (rows,)`` reference log-probs, without gradients.

    ``model`` is a ``SequenceLogProbs`` over a frozen model, or None for the policy's own
    adapter disabled; a batch that carries ``ref_logps`` (precomputed) uses those."""

    def __init__(self, model=None):
        self.model = model

    def __call__(self, module, batch: dict, inputs: dict) -> torch.Tensor:
        if batch.get("ref_logps") is not None:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.model is not None:
                return self.model(**inputs)[0]
            inner = getattr(module, "module", module)  # under DDP, the wrapped SequenceLogProbs
            with inner.model.disable_adapter():
                return inner(**inputs)[0]


def compute(method, reference: Reference, module, items: list, batch_size: int, autocast,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, 2) reference log-probs of ``items`` (row i and row B+i of each micro-batch)."""
    out = torch.zeros(len(items), 2, dtype=torch.float32)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = method.collate(chunk)
        with autocast():
            vals = reference(module, batch, method.inputs(batch)).float()
        n = len(chunk)
        out[start:start + n, 0] = vals[:n]
        out[start:start + n, 1] = vals[n:2 * n]
        if progress:
            progress(n)
    return out


def items_key(parts: dict, splits: dict[str, list]) -> str:
    """A digest of what determines the reference log-probs: the reference's identity
    (``parts``: model path and weights hash, init_from, ref_model, dtype) and every token
    of every item (which covers the data files, template, truncation and KL pairing)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for name, items in sorted(splits.items()):
        h.update(name.encode())
        for it in items:
            for ex in _examples(it):
                h.update(len(ex.input_ids).to_bytes(4, "little"))
                h.update(",".join(map(str, ex.input_ids)).encode())
                h.update(",".join(map(str, ex.labels)).encode())
    return h.hexdigest()


def _examples(item) -> list:
    """The tokenized sequences an item contributes (for the key)."""
    if hasattr(item, "chosen"):
        return [item.chosen, item.rejected]
    return [item.example.completion, item.kl]


def load(folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The stored values when they were computed for ``key``, else None."""
    from safetensors import safe_open

    path = Path(folder) / REF_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged file is recomputed, never trusted
        return None


def save(folder: Path, key: str, values: dict[str, torch.Tensor]) -> None:
    """Write atomically: a run killed mid-write keeps no half file under the final name."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (REF_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in values.items()}, str(tmp), metadata={"key": key})
    os.replace(tmp, folder / REF_FILE)


def attach(items: list, values: torch.Tensor) -> list[WithRef]:
    return [WithRef(it, (float(v[0]), float(v[1]))) for it, v in zip(items, values)]
