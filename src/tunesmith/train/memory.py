"""Memory estimate for one training step, printed before step 1 and used for the fit check.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 2): per layer s*b*h*(34 + 5*a*s/h) bytes at 16-bit, doubled for
fp32; attention via SDPA avoids the 5*a*s/h score term, kept anyway as a safe margin.
The LM head's logits (b*s*V fp32, plus the same again for log-softmax and its gradient)
are added separately as an upper bound: at V=49,152, b=8, s=512 that is 3 x 0.8 GB, but
models/forward.py runs the head on trained tokens only, so the real figure is that times
the trained fraction. With the head chunked (``HEAD_CHUNK`` tokens at a time) they are
bounded by one chunk's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunesmith.errors import TunesmithError
from tunesmith.models.forward import HEAD_CHUNK


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    head_chunk: int | None = None  # trained tokens per LM-head chunk (None: all at once)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def lines(self) -> list[str]:
        g = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
        return [f"weights {g(self.weights)}", f"gradients {g(self.gradients)}", f"optimizer {g(self.optimizer)}",
                f"activations {g(self.activations)}", f"logits ≤ {g(self.logits)}", f"total ≈ {g(self.total)}"]


def estimate(*, total_params: int, trainable_params: int, weight_bytes: float, act_bytes: int,
             layers: int, hidden: int, heads: int, vocab: int, batch: int, seq: int,
             checkpointing: bool, ref_params: int = 0, head_chunk: int | None = None,
             shards: int = 1) -> MemoryEstimate:
    """Bytes one process holds for weights (at ``weight_bytes`` per parameter: 4 fp32, 2 bf16,
    ~0.55 NF4; ``ref_params`` for a frozen reference model kept beside the policy),
    fp32 gradients and AdamW state (2 fp32 moments) of the trainable parameters, and
    activations of one micro-batch of ``batch`` x ``seq`` tokens. ``shards`` > 1 (FSDP2): each
    process holds 1/shards of the policy's weights, gradients and moments, plus the root's
    weights (embeddings and head, ~vocab x hidden; FSDP2 keeps the root gathered through the
    step) and one layer's gathered while it runs; the reference (not sharded) stays whole."""
    per_layer = seq * batch * hidden * (34 + 5 * heads * seq / hidden) * act_bytes / 2
    # With checkpointing only each layer's input (s*b*h) is kept, plus one layer recomputed.
    acts = layers * seq * batch * hidden * act_bytes + per_layer if checkpointing else layers * per_layer
    chunk = head_chunk if head_chunk and head_chunk < batch * seq else None  # fewer tokens: one piece
    gathered = vocab * hidden + total_params / layers if shards > 1 else 0
    return MemoryEstimate(weights=int((total_params / shards + gathered + ref_params) * weight_bytes),
                          gradients=trainable_params * 4 // shards, optimizer=trainable_params * 8 // shards,
                          activations=int(acts),
                          logits=3 * (chunk or batch * seq) * vocab * 4, head_chunk=chunk)


def plan(*, checkpointing: bool | str, limit: int, full: bool, **sizes) -> tuple[MemoryEstimate, bool]:
    """(estimate of one training step, whether gradient checkpointing is on), refused in one
    sentence when even the most frugal step does not fit in ``limit`` bytes. ``checkpointing``:
    True, False or "auto"; ``sizes``: ``estimate``'s sizes. What saves memory is switched on
    only as far as the step needs, cheapest first: the LM head in chunks (~5-10% of a step,
    see models/forward.py), then gradient checkpointing (a second forward, ~30%). With
    checkpointing on the head is always chunked: its logits are then most of the step."""
    steps = {True: [(True, HEAD_CHUNK)], False: [(False, None), (False, HEAD_CHUNK)],
             "auto": [(False, None), (False, HEAD_CHUNK), (True, HEAD_CHUNK)]}[checkpointing]
    for on, chunk in steps:
        est = estimate(**sizes, checkpointing=on, head_chunk=chunk)
        if est.total <= limit:
            break
    if est.total > limit:
        gib = lambda x: f"{x / 2**30:.1f} GiB"  # noqa: E731
        hint = ("use LoRA instead (remove `full: true`; a rank-8 adapter trains ~1% of the weights)"
                if full else "lower train.batch_size or data.max_length")
        raise TunesmithError(f"the estimated memory of a training step, {gib(est.total)}, exceeds the "
                             f"{gib(limit)} available; {hint}")
    return est, on


def per_process(total_params: int, trainable_params: int, weight_bytes: float, processes: int,
                strategy: str) -> str:
    """The start-up line comparing what one process holds under DDP and under FSDP2."""
    unit, div = ("GiB", 2**30) if total_params * weight_bytes >= 2**30 else ("MiB", 2**20)
    whole = (total_params * weight_bytes, trainable_params * 4, trainable_params * 8)
    ddp = " + ".join(f"{x / div:.2f}" for x in whole)
    fsdp = " + ".join(f"{x / processes / div:.2f}" for x in whole)
    return (f"per process at {processes} process{'es' if processes > 1 else ''} (weights + gradients + optimizer, "
            f"{unit}): DDP {ddp}, FSDP2 {fsdp} plus the root's and one layer's weights gathered (train.distributed: "
            f"{strategy})")


def budget(limit_gib: float | None, device: str, processes: int) -> int:
    """Bytes one process may use: the configured limit, else what the device has free;
    CPU processes share the host's RAM, so each gets its share."""
    limit = int(limit_gib * 2**30) if limit_gib else available_bytes(device)
    return limit // (processes if device == "cpu" else 1)


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reset_peak(device: str) -> int:
    """Start measuring the peak memory of what follows (training steps, not model loading):
    CUDA's allocator peak, or the process's peak RSS (Linux resets VmHWM via clear_refs).
    Returns the memory in use now, so that the peak minus it is what the steps added
    (gradients, optimizer state, activations) over the loaded model and libraries."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then includes loading
        pass
    return _status_bytes("VmRSS:")


def _status_bytes(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_bytes(device: str) -> tuple[int, str]:
    """(peak bytes since ``reset_peak``, what was measured)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda max allocated"
    hwm = _status_bytes("VmHWM:")
    if hwm:
        return hwm, "peak RSS"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (whole process)"
