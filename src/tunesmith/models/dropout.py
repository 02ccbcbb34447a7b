"""LoRA dropout that does not spend a fifth of a CPU step drawing random numbers.

Why our own module: PEFT gives every adapted linear its own ``nn.Dropout`` on the layer's
input (7 per SmolLM2 layer with ``all-linear``). On a CPU, ``torch``'s dropout draws one
random number per element serially (``bernoulli_`` runs ``cpu_serial_kernel``) and works
in the input's dtype, fp32 here even under bf16 autocast. Profiled on SmolLM2-135M, LoRA
r=8 all-linear, batch 8 x 128 tokens, 2 threads: ``aten::dropout`` took 22.6% of the
step, ``aten::mm`` 22.7% (``bench/`` has the figures before and after).

``FastDropout`` is the same operation — every element kept independently with
probability 1 - p and scaled by 1 / (1 - p) — with two changes in how it is computed:
- each 64-bit draw of the torch generator gives the keep decisions of four elements
  (15 uniform bits each), so p is applied as ``round(p * 32768) / 32768`` (0.05 →
  0.04999); seeding (``torch.manual_seed``) makes it reproducible as before;
- under CPU autocast the input is cast to the autocast dtype first: the adapter's
  ``lora_A`` matmul casts it there anyway, so the mask multiply moves half the bytes.
Off the CPU (CUDA's dropout is a fused kernel) and outside training it is ``nn.Dropout``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 15  # uniform levels per element: 15 bits of every 16-bit slice of a draw


def drop_mask(shape, p: float, device=None) -> torch.Tensor:
    """Bool tensor of ``shape``: True (drop) with probability round(p * 2^15) / 2^15, independently."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # [0, 2^63)
    bits = draws.view(torch.int16)[:n].view(shape).bitwise_and_(_LEVELS - 1)       # the top slice has 15 bits
    return bits < round(p * _LEVELS)


# The mask as an opaque custom op, so that under torch.compile (train.compile) the draw stays
# ours while inductor fuses the fill and the scale into the layer around it: dynamo cannot trace
# Tensor.random_ (a graph break at every adapted linear), and inductor's own CPU dropout measured
# 10.6 ms against this draw's 3.5 ms on a 1024 x 1536 bf16 input. ``slot`` tells the calls on one
# input apart (q/k/v share the layer's input, gate/up theirs): AOTAutograd's common-subexpression
# pass merges identical calls of an op it does not know to be random, which would give them one
# mask. It is the adapted linear's place in its layer (``use_fast_dropout``), the same in every
# layer, so all layers still compile to one graph. The mask is saved for the backward, not
# recomputed (custom ops are not on the partitioner's recompute list; under activation
# checkpointing the tag makes the recomputation replay the same random state).
@torch.library.custom_op("tunesmith::drop_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _mask(x: torch.Tensor, p: float, slot: int) -> torch.Tensor:
    return _draw(x, p, slot)


def _draw(x: torch.Tensor, p: float, slot: int) -> torch.Tensor:
    # Inductor may run the independent draws of one layer (q/k/v) in another order than eager
    # does, so compiled masks are the same distribution, not the same bits (tests key them on slot)
    return drop_mask(x.shape, p, x.device)


@_mask.register_fake
def _(x: torch.Tensor, p: float, slot: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


class FastDropout(nn.Dropout):
    def __init__(self, p: float = 0.5, inplace: bool = False, slot: int = 0):
        super().__init__(p, inplace)
        self.slot = slot  # this dropout's place in its layer (see _mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0 or self.p >= 1 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        if x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            x = x.to(torch.get_autocast_dtype("cpu"))
        # masked_fill: a bool mask multiplied in would first be cast to x's dtype (one more copy)
        return x.masked_fill(_mask(x, self.p, self.slot), 0).mul_(1.0 / (1.0 - self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Swap the ``nn.Dropout`` of every LoRA layer of a PEFT model for ``FastDropout``
    (same p); returns how many were swapped. Dropout has no weights: saved adapters and
    their configs are unchanged."""
    swapped, slots = 0, {}
    for path, module in model.named_modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        place = re.sub(r"\.\d+(?=\.|$)", ".#", path)  # layers.3.self_attn.q_proj → layers.#.self_attn.q_proj
        for name, drop in list(drops.items()):
            if type(drop) is nn.Dropout:
                drops[name] = FastDropout(drop.p, drop.inplace, slot=slots.setdefault((place, name), len(slots)))
                swapped += 1
    return swapped
