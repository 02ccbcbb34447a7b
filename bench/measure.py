"""What every runner is measured with, the same way: step clock, token counts, peak memory.

- Step clock: a *global* optimizer step post-hook (``torch.optim.optimizer.
  register_optimizer_step_post_hook``) stamps ``time.perf_counter()`` after every
  ``optimizer.step()`` of any torch optimizer — tunesmith's AdamW, TRL's fused AdamW
  behind accelerate, the plain loop's — so no runner reports its own time.
- Tokens: every forward that carries labels is recorded with the number of optimizer
  steps finished when it ran (its step index). A forward with gradients is a policy
  pass (trained); one without is a reference pass (DPO), counted apart for FLOPs.
- Window: steps ``warmup+1 .. total``. Time = stamp(total) - stamp(warmup); tokens =
  the passes whose step index lies in ``[warmup, total)``. Whatever runs before the first
  step (loading, tokenizing, TRL's or tunesmith's reference precompute) falls into the
  warm-up and is reported apart as ``pre_train_s``.
- Peak memory: ``VmHWM`` of the worker process (one configuration per process) from
  /proc/self/status, i.e. the peak resident set including imports and model load; on
  CUDA also ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Pass:
    step: int            # optimizer steps finished before this forward
    grad: bool           # a policy pass (with gradients) or a reference pass (without)
    real: int            # non-padding tokens in the batch
    trained: int         # positions whose label is predicted (labels[:, 1:] != -100)
    sq_lengths: int      # sum over sequences of length^2 (attention FLOPs)
    rows: int


@dataclass
class Recorder:
    stamps: list[float] = field(default_factory=list)
    passes: list[Pass] = field(default_factory=list)
    begin: float = field(default_factory=time.perf_counter)

    def install(self) -> "Recorder":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def stamp(*_):
            sync()  # CUDA runs asynchronously: the step is done when the device is
            self.stamps.append(time.perf_counter())

        register_optimizer_step_post_hook(stamp)
        return self

    def record(self, input_ids, labels=None, attention_mask=None, position_ids=None) -> None:
        if input_ids is None:
            return
        lengths = _sequence_lengths(input_ids, attention_mask, position_ids)
        trained = int((labels[:, 1:] != -100).sum()) if labels is not None else 0
        self.passes.append(Pass(len(self.stamps), torch.is_grad_enabled(), int(sum(lengths)), trained,
                                int(sum(n * n for n in lengths)), len(lengths)))

    def hook_causal_lm(self, model) -> None:
        """Count the forwards of a transformers causal LM (kwargs carry input_ids/labels)."""
        def pre(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.record(ids, kwargs.get("labels"), kwargs.get("attention_mask"), kwargs.get("position_ids"))
        model.register_forward_pre_hook(pre, with_kwargs=True)

    def window(self, warmup: int) -> dict:
        """Throughput over steps warmup+1 .. the last step."""
        total = len(self.stamps)
        if total <= warmup or warmup < 1:
            raise RuntimeError(f"{total} optimizer steps ran; need more than the {warmup} warm-up steps")
        seconds = self.stamps[-1] - self.stamps[warmup - 1]
        inside = [p for p in self.passes if warmup <= p.step < total]
        pol = [p for p in inside if p.grad]
        ref = [p for p in inside if not p.grad]
        gaps = [b - a for a, b in zip(self.stamps[warmup - 1:], self.stamps[warmup:])]
        step_s = statistics.median(gaps)
        return {
            "steps_total": total, "warmup_steps": warmup, "measured_steps": total - warmup,
            "measured_s": round(seconds, 4), "step_s_median": round(step_s, 4),
            "tokens": sum(p.real for p in pol), "trained_tokens": sum(p.trained for p in pol),
            "rows": sum(p.rows for p in pol), "sq_lengths": sum(p.sq_lengths for p in pol),
            "ref_tokens": sum(p.real for p in ref), "ref_sq_lengths": sum(p.sq_lengths for p in ref),
            "ref_trained_tokens": sum(p.trained for p in ref),
            # everything before steady state: load, tokenize, precompute, first-step overheads
            "pre_train_s": round(max(0.0, self.stamps[0] - self.begin - step_s), 3),
            "first_step_s": round(self.stamps[0] - self.begin, 3),
            # every step's seconds (step 1: from the runner's start), to see warm-up effects
            "step_seconds": [round(b - a, 3) for a, b in zip([self.begin] + self.stamps, self.stamps)],
        }


def _sequence_lengths(input_ids, attention_mask, position_ids) -> list[int]:
    """Real length of every sequence: rows of a 2D mask, or the segments of a flattened
    padding-free row (position ids restart at 0), or whole rows."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return [int(n) for n in attention_mask.sum(dim=1)]
    if position_ids is not None and attention_mask is None:
        out = []
        for row in position_ids:
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            out += [b - a for a, b in zip(starts, starts[1:]) if b > a]
        return out
    return [int(input_ids.shape[1])] * int(input_ids.shape[0])


def peak_memory() -> dict:
    out = {"peak_rss_gib": None, "cuda_peak_gib": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak_rss_gib"] = round(int(line.split()[1]) / 2**20, 3)  # kB -> GiB
    except OSError:
        import resource

        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if torch.cuda.is_available():
        out["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out
