"""The one training loop every method runs on (SFT, DPO family, reward model, GRPO).

Why our own loop on ``accelerate`` rather than ``transformers.Trainer``/TRL: speed, and
guarantees. ``python -m bench`` on this 2-core AMX CPU: LoRA SFT 1.7x TRL's best settings
and 2.0x its defaults (gradient checkpointing on; on CPUs without a native bf16 path TRL's
default bf16 autocast is emulated and far slower), 2.3x on variable-length Alpaca (length
grouping), 1.16x a bare PyTorch + PEFT loop (the LM head only on trained positions, LoRA
dropout drawn without torch's serial RNG: ``models/dropout.py``). And the HF Trainer's
checkpoints are not atomic and resume quietly without missing optimizer/RNG state. Here:

- the data order of every epoch is a pure function of (seed, epoch), so the cursor is
  just the global step and a resumed run replays exactly the batches it would have seen;
- one optimizer step = ``grad_accum`` x ``world`` micro-batches of ``batch_size``; the
  loss is normalised by the units (trained tokens, pairs) of the whole step, counted
  before the first backward and summed over processes, so 1x8, 4x2 and 2 processes x 4
  give the same update (the known accumulation bug: averaging per micro-batch means);
- a non-finite loss or gradient norm skips the update; N in a row stop the run. A
  checkpoint and ``final/`` are written from finite weights only, and a checkpoint counts
  as good once the weights it holds have produced a finite loss (the next step's, or an
  eval's): a run that diverges stops non-zero, naming the step and its last good
  checkpoint, and moves the checkpoints written after it aside (``diverged-checkpoint-N``)
  so that ``--resume`` starts from the good one;
- SIGTERM and SIGINT (Ctrl-C) finish the current step, save a checkpoint and stop; one
  that arrives during the final eval or save lets them finish;
- ``--resume`` refuses training data, a tokenizer or a chat template that differ from the
  ones the checkpoint was trained on (``inputs``), unless forced.

A method subclasses ``Method`` in ``train/methods/base.py``, which declares every member
the engine calls (``wrap``, ``collate``, ``rollout``, ``units``, ``loss``,
``trained_tokens``) and the defaults of the optional ones.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from tunesmith import console
from tunesmith.errors import TunesmithError
from tunesmith.files import dumps, read_jsonl, write_text_atomic
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed as dist

if TYPE_CHECKING:
    from tunesmith.train.methods.base import Method


@dataclass
class LoopArgs:
    output_dir: Path
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 50
    save_total_limit: int | None = 2
    eval_steps: int = 50
    logging_steps: int = 1
    max_nonfinite: int = 5
    autocast_dtype: torch.dtype | None = None
    head_chunk: int | None = None                    # trained tokens per LM-head chunk (the memory plan's)
    group_by_length: bool = True
    distributed: str = "ddp"                         # several processes: "ddp" or "fsdp2" (train/distributed.py)
    config: dict = field(default_factory=dict)       # resolved run config, saved with checkpoints
    inputs: dict = field(default_factory=dict)       # {name: sha256} of what training reads, checked on resume
    resume_ignore: frozenset = frozenset()           # config keys allowed to change on resume
    force_resume: bool = False


@dataclass
class FitResult:
    step: int
    metrics: dict[str, float]
    stopped_by_signal: bool = False
    signal: str | None = None      # "SIGTERM" or "SIGINT" when stopped_by_signal
    forced: list[str] = field(default_factory=list)  # what changed but was resumed over (--force-resume)
    skipped_steps: int = 0
    efficiency: float = 1.0
    peak_memory_bytes: int = 0     # during training steps (peak RSS on CPU, allocator peak on CUDA)
    peak_memory_kind: str = ""
    step_memory_bytes: int = 0     # the peak minus the memory in use when training started
    peak_memory_per_process: list[int] = field(default_factory=list)  # every process's peak, by rank
    state_bytes_per_process: list[dict] = field(default_factory=list)  # weights/gradients/optimizer held, by rank
    sharded_units: int = 0         # FSDP2 units (0: not sharded)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step s: linear warmup from 0, then
    cosine/linear/flat — the same curves as transformers' get_*_schedule_with_warmup."""
    def f(s: int) -> float:
        if s < warmup:
            return s / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return f


def epoch_order(lengths: list[int], epoch: int, seed: int, batch_size: int, group_by_length: bool) -> list[int]:
    """The order of items in ``epoch``: a pure function of its arguments (exact resume)."""
    from tunesmith.data.batches import length_grouped_order

    if group_by_length:
        return list(length_grouped_order(lengths, batch_size, seed=seed * 100_003 + epoch))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(len(lengths), generator=g).tolist()


class _Stop:
    """SIGTERM or SIGINT (Ctrl-C) → finish the step, checkpoint, stop; ``name`` says which."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name: str | None = None
        self._old: dict = {}

    @property
    def flag(self) -> bool:
        return self.name is not None

    def __enter__(self):
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. some test runners)
            self._old = {}
        return self

    def _handle(self, signum, _frame):
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _reduce_sum(accelerator, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise TunesmithError(f"the checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}); "
                             f"it belongs to a different model or adapter config — start again without --resume")
    wrong = next((n for n, t in tensors.items() if n not in params or params[n].shape != t.shape), None)
    if wrong is not None:
        have = tuple(params[wrong].shape) if wrong in params else "no such tensor"
        raise TunesmithError(f"the checkpoint's {wrong} has shape {tuple(tensors[wrong].shape)} where this model has "
                             f"{have}: it belongs to a different model or adapter config (lora.r, target_modules) — "
                             f"restore that config, or start again without --resume")
    with torch.no_grad():
        for n, t in tensors.items():
            dist.copy_into(params[n], t)  # a sharded parameter keeps its slice


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint (they are replayed), and a
    torn last line a kill left; the rewrite is atomic."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in keep))


def _to_device(batch: dict, device) -> dict:
    """Move a collated batch's tensors to the training device (collate builds them on CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _means(sums: dict[str, float], units: float) -> dict[str, float]:
    """Metric sums → means. A metric ``x`` is divided by the sum of its ``n:x`` companion
    when the method gives one (KTO's rewards/chosen averages over desirable examples
    only), else by the units of the window; a mean over nothing is left out."""
    out = {}
    for k, v in sums.items():
        if k.startswith("n:"):
            continue
        denom = sums.get("n:" + k, units)
        if denom > 0:
            out[k] = v / denom
    if "rewards/margins" not in out and {"rewards/chosen", "rewards/rejected"} <= out.keys():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]  # unpaired: difference of means
    return out


def evaluate(module, method: Method, items: list, batch_size: int, accelerator, autocast) -> dict[str, float]:
    """Unit-weighted mean of the method's loss and metrics over ``items`` (all processes)."""
    module.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    sums: dict[str, float] = {}
    units = 0.0
    starts = list(range(0, len(items), batch_size))
    # Sharded, every forward is a collective: each process runs as many, the missing ones
    # repeating batches whose results are dropped (any number of batches and processes).
    passes = -(-len(starts) // world) * world if dist.is_sharded(module) else len(starts)
    with torch.no_grad():
        for i, start in enumerate(starts[k % len(starts)] for k in range(passes)):
            if i % world != rank:
                continue
            batch = method.rollout(method.collate(items[start:start + batch_size]), None)
            batch = _to_device(batch, accelerator.device)
            with autocast():
                loss_sum, metrics = method.loss(module, batch)
            if i >= len(starts):
                continue
            units += method.units(batch)
            sums["loss"] = sums.get("loss", 0.0) + float(loss_sum)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(sums) if sums else ["loss"]
    totals = _reduce_sum(accelerator, [units] + [sums.get(k, 0.0) for k in keys])
    module.train()
    return {f"eval_{k}": v for k, v in _means(dict(zip(keys, totals[1:])), max(totals[0], 1.0)).items()}


# ---------------------------------------------------------------- state of a run


@dataclass
class TrainerState:
    """The counters saved as ``trainer_state.json``; ``to_dict``'s keys are that file's format."""

    skipped: int = 0                 # updates skipped for a non-finite loss or gradient norm
    consecutive_nonfinite: int = 0   # of them in a row; ``max_nonfinite`` stop the run
    best: dict = field(default_factory=dict)
    last_good_step: int = -1         # newest step whose weights produced a finite loss (0: the start)

    _KEYS = ("skipped", "consecutive_nonfinite", "best", "last_good_step")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._KEYS}

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        """A key the file lacks keeps its default, so older checkpoints load too."""
        return cls(**{k: d[k] for k in cls._KEYS if k in d})

    def count(self, finite: bool, step: int) -> None:
        """Step ``step`` (1-based) was finite or not; if it was, the weights it started
        from (those of step - 1) produced a finite loss."""
        if finite:
            self.last_good_step = max(self.last_good_step, step - 1)
            self.consecutive_nonfinite = 0
        else:
            self.skipped += 1
            self.consecutive_nonfinite += 1


@dataclass
class _Window:
    """Sums over the optimizer steps since the last metrics line: its means and rates."""

    t0: float = field(default_factory=time.perf_counter)
    real: float = 0.0                # real (non-padding) tokens, this process
    trained: float = 0.0             # tokens that received a gradient, this process
    sums: dict[str, float] = field(default_factory=dict)  # loss and metrics, all processes, finite steps
    units: float = 0.0
    grad_norm: float | None = None   # of the last finite step

    def add(self, units: float, loss: float, sums: dict[str, float], grad_norm: float) -> None:
        """One finite step (skipped ones add their tokens only)."""
        self.units += units
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.grad_norm = grad_norm

    def record(self, step: int, epoch: float, lr: float, world: int) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rec = {"step": step, "epoch": epoch, "learning_rate": lr, "grad_norm": self.grad_norm}
        rec.update(_means(self.sums, max(self.units, 1.0)))
        # x world: every process counts its own tokens, and they run in parallel.
        rec["tokens_per_second"] = round(self.real * world / dt, 2)
        rec["trained_tokens_per_second"] = round(self.trained * world / dt, 2)
        return rec

    def reset(self) -> None:
        vars(self).update(vars(_Window()))


class _MetricsLog:
    """``metrics.jsonl`` (one JSON object a line), each record also passed to ``log_to``
    (the run's experiment trackers, ``train/trackers.py``), on the main process only."""

    def __init__(self, out: Path, enabled: bool, resumed_at: int | None,
                 log_to: Callable[[dict], None] | None = None):
        self.path, self.enabled, self.log_to = out / "metrics.jsonl", enabled, log_to
        if not enabled:
            return
        if resumed_at is not None:
            _truncate_metrics(self.path, resumed_at)
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(dumps(record) + "\n")  # strict JSON: a NaN is written as null
        if self.log_to is not None:
            self.log_to(record)


# ---------------------------------------------------------------- set-up, resume, save


@dataclass(frozen=True)
class _Plan:
    """How long the run is, in optimizer steps, and what each step consumes."""

    per_step: int          # items per optimizer step, all processes
    steps_per_epoch: int
    total: int
    warmup: int


def _plan(n_items: int, args: LoopArgs, world: int) -> _Plan:
    per_step = args.batch_size * args.grad_accum * world
    steps_per_epoch = n_items // per_step
    if steps_per_epoch == 0:
        raise TunesmithError(
            f"the training set has {n_items} items, fewer than one optimizer step "
            f"(batch_size {args.batch_size} x grad_accum {args.grad_accum} x {world} processes = {per_step}); "
            f"lower train.batch_size or train.grad_accum, or add data")
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.epochs * steps_per_epoch))
    return _Plan(per_step, steps_per_epoch, total, args.warmup_steps or int(args.warmup_ratio * total))


@dataclass
class _Training:
    """What the steps update: built by ``_set_up``, restored by ``_resume``."""

    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    module: torch.nn.Module            # method.wrap(model): DDP-wrapped under several processes, or FSDP2-sharded
    autocast: Callable[[], Any]
    sharded_units: int = 0             # FSDP2 units (0: not sharded)
    state_bytes: dict[str, int] = field(default_factory=dict)  # measured at the first step


def _set_up(model, method: Method, args: LoopArgs, plan: _Plan, accelerator) -> _Training:
    # The method's forward wrapper (log-probs of trained tokens by default; scores for a reward
    # model), sharded before the optimizer sees its parameters, or DDP-wrapped after.
    units = 0
    if args.distributed == "fsdp2":
        module = method.wrap(model, head_chunk=args.head_chunk)
        units = dist.shard(module, model, accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW (one kernel over all tensors): measured here 7x faster than the default
    # for-each update on SmolLM2's 135M parameters, which dominated full fine-tuning steps.
    # transformers' default optimizer (adamw_torch_fused) is the same.
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, plan.warmup, plan.total))
    if not units:
        module = accelerator.prepare_model(method.wrap(model, head_chunk=args.head_chunk))
    autocast = (lambda: torch.autocast(accelerator.device.type, dtype=args.autocast_dtype)) \
        if args.autocast_dtype not in (None, torch.float32) else contextlib.nullcontext
    return _Training(trainable, optimizer, scheduler, module, autocast, units)


def _changed_inputs(old: dict | None, new: dict) -> list[str]:
    """What training reads that differs from what the checkpoint was trained on, one phrase each."""
    if old is None:  # written before inputs were recorded: nothing to compare
        return []
    return [f"{name} (sha256 {str(old.get(name))[:12]}… → {str(new.get(name))[:12]}…)"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def _resume(model, t: _Training, args: LoopArgs, plan: _Plan,
            accelerator) -> tuple[int, TrainerState, list[str]]:
    """Restore the newest complete checkpoint in ``output_dir``: (its step, its counters,
    what changed since and was resumed over with --force-resume)."""
    out = Path(args.output_dir)
    complete, incomplete = ckpt.find_checkpoints(out)
    for path, why in incomplete:
        if accelerator.is_main_process:
            console.warn(f"skipping incomplete checkpoint {path.name}: {why}")
    dist.agree_on_checkpoint(accelerator, complete[-1] if complete else None, out)
    if not complete:
        raise TunesmithError(f"--resume: no complete checkpoint in {out}; start the run without --resume")
    c = ckpt.load_checkpoint(complete[-1])
    was = c.cursor.get("per_step", plan.per_step)
    if was != plan.per_step:
        n = c.cursor.get("processes", "?")
        raise TunesmithError(
            f"--resume: {complete[-1].name} was trained with {was} items per optimizer step ({n} processes), this "
            f"launch takes {plan.per_step} (batch_size {args.batch_size} x grad_accum {args.grad_accum} x "
            f"{accelerator.num_processes} processes); set train.grad_accum so the product is {was} again, or "
            f"launch {n} processes")
    # grad_accum may change with the process count where the items per step were checked above
    # (checkpoints written before they were recorded: not)
    also = {"train.grad_accum"} if "per_step" in c.cursor else set()
    changed = ckpt.config_diff(c.config, args.config, set(args.resume_ignore) | also)
    if changed and not args.force_resume:
        raise TunesmithError(
            f"--resume: the config changed since {complete[-1].name} in keys that alter training "
            f"({', '.join(changed[:5])}); restore them, or pass --force-resume to continue anyway")
    inputs = _changed_inputs(c.inputs, args.inputs)
    if inputs and not args.force_resume:
        raise TunesmithError(
            f"--resume: what training reads changed since {complete[-1].name}: {inputs[0]}"
            f"{f' and {len(inputs) - 1} more' if len(inputs) > 1 else ''}; restore it, or pass --force-resume to "
            f"continue on the new one (run.json then records it)")
    forced = [f"config {k}" for k in changed] + inputs
    if forced and accelerator.is_main_process:
        console.warn(f"--force-resume: continuing although {', '.join(forced[:3])} changed")
    _load_trainable(model, c.state_dicts["trainable"])
    t.optimizer.load_state_dict(dist.optimizer_state_for(t.optimizer, c.optimizer_state))
    t.scheduler.load_state_dict(c.scheduler_state)
    ckpt.restore_rng(dist.rng_of_this_process(c.rng_state, accelerator))
    step = int(c.cursor["step"])
    if accelerator.is_main_process:
        console.info(f"resumed from {complete[-1]} at step {step}/{plan.total}")
    return step, TrainerState.from_dict(c.trainer_state), forced


# ---------------------------------------------------------------- one optimizer step


class _Batches:
    """This process's micro-batches of each optimizer step, collated and rolled out on CPU."""

    def __init__(self, method: Method, items: list, lengths: list[int], args: LoopArgs, plan: _Plan, accelerator):
        self.method, self.items, self.lengths, self.args, self.plan = method, items, lengths, args, plan
        self.accelerator = accelerator
        self._epoch, self._order = -1, []

    def __call__(self, step: int) -> list[dict]:
        """Of step ``step`` (0-based): all before the first backward, so a sampling method's
        rollouts of one step all come from the policy before its update."""
        args, world = self.args, self.accelerator.num_processes
        epoch, k = divmod(step, self.plan.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(self.lengths, epoch, args.seed, args.batch_size, args.group_by_length)
        base = k * self.plan.per_step
        micro = [self._order[base + m * args.batch_size: base + (m + 1) * args.batch_size]
                 for m in range(args.grad_accum * world)]
        return [_to_device(self.method.rollout(self.method.collate([self.items[i] for i in idx]), step + 1),
                           self.accelerator.device)
                for j, idx in enumerate(micro) if j % world == self.accelerator.process_index]


@dataclass
class _Step:
    """One optimizer step's outcome; sums are over all processes."""

    finite: bool
    units: float
    loss: float                 # summed over the units
    sums: dict[str, float]      # metric sums, by name
    grad_norm: float
    lr: float                   # the learning rate the step used


def _backward(method: Method, t: _Training, batches: list[dict], units: float, accelerator) -> tuple[float, dict]:
    """Accumulate the gradients of ``batches``: (this process's loss sum, metric sums)."""
    world = accelerator.num_processes
    loss_local, sums_local = 0.0, {}
    for j, batch in enumerate(batches):
        # FSDP2 reduce-scatters every micro-batch (train/distributed.py: whole gradients otherwise)
        sync = contextlib.nullcontext() if j == len(batches) - 1 or t.sharded_units else \
            accelerator.no_sync(t.module)
        with sync:
            with t.autocast():
                loss_sum, metrics = method.loss(t.module, batch)
            # x world: DDP and FSDP2 average gradients over processes; we want the sum / units.
            accelerator.backward(loss_sum * (world / max(units, 1.0)))
        loss_local += float(loss_sum.detach())
        for key, v in metrics.items():
            sums_local[key] = sums_local.get(key, 0.0) + float(v)
    return loss_local, sums_local


def _optimizer_step(method: Method, t: _Training, batches: list[dict], args: LoopArgs, accelerator) -> _Step:
    """Forward/backward over the step's micro-batches, then the update unless any process
    saw a non-finite loss or gradient norm; the scheduler advances either way."""
    units = _reduce_sum(accelerator, [float(sum(method.units(b) for b in batches))])[0]
    loss_local, sums_local = _backward(method, t, batches, units, accelerator)
    grad_norm = dist.grad_norm(t.trainable, args.max_grad_norm)
    keys = sorted(sums_local)
    reduced = _reduce_sum(accelerator, [loss_local] + [sums_local[x] for x in keys])
    finite = math.isfinite(reduced[0] / max(units, 1.0)) and math.isfinite(grad_norm)
    finite = _reduce_sum(accelerator, [0.0 if finite else 1.0])[0] == 0.0
    if finite:
        t.optimizer.step()
    if finite and not t.state_bytes:
        t.state_bytes = dist.state_bytes(t.module, t.trainable, t.optimizer)
    t.optimizer.zero_grad(set_to_none=True)
    lr = t.scheduler.get_last_lr()[0]
    t.scheduler.step()
    return _Step(finite, units, reduced[0], dict(zip(keys, reduced[1:])), grad_norm, lr)


def _count_tokens(method: Method, batches: list[dict], window: _Window, totals: list[int],
                  processed_tokens: Callable[[dict], tuple[int, int]] | None) -> None:
    """Add the step's tokens to the window (rates) and ``totals`` [real, processed] (efficiency)."""
    for batch in batches:
        if processed_tokens is not None:
            real, processed = processed_tokens(batch)
            totals[0] += real
            totals[1] += processed
            window.real += real
        window.trained += method.trained_tokens(batch)


# ---------------------------------------------------------------- the loop


@dataclass
class _Run:
    """What the steps of one ``fit`` share, and what they do besides the update."""

    model: Any
    method: Method
    eval_items: list
    args: LoopArgs
    plan: _Plan
    accelerator: Any
    t: _Training
    state: TrainerState
    log: _MetricsLog
    last_metrics: dict[str, float] = field(default_factory=dict)  # the newest value of each metric

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out loss and metrics of the weights after ``step``; a non-finite loss counts
        as a non-finite step (the weights, not the data, are what changed)."""
        ev = evaluate(self.t.module, self.method, self.eval_items, self.args.batch_size, self.accelerator,
                      self.t.autocast)
        self.log.write({"step": step, **ev})
        if math.isfinite(ev.get("eval_loss", 0.0)):
            self.state.last_good_step = max(self.state.last_good_step, step)
        else:
            self.state.consecutive_nonfinite += 1
            if self.accelerator.is_main_process:
                console.warn(f"step {step}: the held-out loss is not finite ({ev.get('eval_loss')})")
            if self.state.consecutive_nonfinite >= self.args.max_nonfinite:
                self.diverged(step, "the held-out loss is not finite")
        return ev

    def good_checkpoint(self) -> Path | None:
        """The newest complete checkpoint whose weights have produced a finite loss."""
        good = [p for p in ckpt.find_checkpoints(self.args.output_dir)[0]
                if ckpt.step_of(p) <= self.state.last_good_step]
        return good[-1] if good else None

    def save(self, step: int) -> None:
        """A checkpoint of the weights after ``step``, from finite weights only; ``keep_last``
        never deletes the newest good one."""
        args, plan, sharded = self.args, self.plan, bool(self.t.sharded_units)
        if not dist.all_finite(self.t.trainable):
            self.diverged(step, f"the weights after step {step} are not finite")
        rng = dist.rng_of_every_process(self.accelerator)
        if sharded:  # every process takes part in gathering the shards; rank 0 writes them
            trainable = dist.full_state((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
            optimizer = dist.full_optimizer_state(self.t.optimizer.state_dict())
        elif self.accelerator.is_main_process:
            trainable, optimizer = _trainable_state(self.model), self.t.optimizer.state_dict()
        if self.accelerator.is_main_process:
            ckpt.save_checkpoint(
                args.output_dir, step, state_dicts={"trainable": trainable},
                optimizer_state=optimizer, scheduler_state=self.t.scheduler.state_dict(), rng_state=rng,
                cursor={"step": step, "epoch": step // plan.steps_per_epoch,
                        "samples_consumed": step * plan.per_step, "seed": args.seed,
                        "processes": self.accelerator.num_processes, "per_step": plan.per_step},
                trainer_state=self.state.to_dict(), config=args.config, inputs=args.inputs,
                keep_last=args.save_total_limit, protect=self.good_checkpoint())
        self.accelerator.wait_for_everyone()

    def record_step(self, step: int, s: _Step, window: _Window, progress: _progress) -> None:
        """Count step ``step`` (1-based) in the trainer state and the logging window."""
        self.state.count(s.finite, step)
        if not s.finite:
            self.skipped(step, s)
            return
        window.add(s.units, s.loss, s.sums, s.grad_norm)
        if step % self.args.logging_steps == 0 or step == self.plan.total:
            rec = window.record(step, round(step / self.plan.steps_per_epoch, 4), s.lr,
                                self.accelerator.num_processes)
            self.log.write(rec)
            self.last_metrics.update(rec)
            progress.update(step, rec)
            window.reset()

    def skipped(self, step: int, s: _Step) -> None:
        """Report a non-finite step; stop as diverged once ``max_nonfinite`` came in a row."""
        if self.accelerator.is_main_process:
            console.warn(f"step {step}: non-finite loss or gradient norm "
                         f"(loss {s.loss / max(s.units, 1.0)}, grad_norm {s.grad_norm}); update skipped")
        self.log.write({"step": step, "skipped_nonfinite": 1, "loss": None, "grad_norm": None})
        if self.state.consecutive_nonfinite >= self.args.max_nonfinite:
            self.diverged(step, f"{self.state.consecutive_nonfinite} consecutive non-finite losses or gradients")

    def diverged(self, step: int, why: str) -> None:
        """Stop: name the last good checkpoint and move the later ones aside, so that
        ``--resume`` continues from weights that gave a finite loss. Raises."""
        good = self.good_checkpoint()
        moved: list[Path] = []
        if self.accelerator.is_main_process:
            moved = ckpt.set_aside(self.args.output_dir, after=self.state.last_good_step)
        self.accelerator.wait_for_everyone()
        if good is not None:
            where = f"the last good checkpoint is {good}, and --resume continues from it"
            where += f" ({len(moved)} later ones kept as diverged-checkpoint-N)" if moved else ""
        else:
            where = ("no checkpoint holds weights that gave a finite loss"
                     + (" (train.save_steps is 0)" if self.args.save_steps == 0 else ""))
        raise TunesmithError(f"training diverged at step {step}: {why}; {where} — lower train.learning_rate or "
                             f"check the data")

    def finish(self, step: int, save_final: Callable[[Path, dict | None], None]) -> None:
        """The final eval, checkpoint and ``final/``: only from weights that are finite and
        did not end on a non-finite step."""
        if self.eval_items:
            self.last_metrics.update(self.evaluate(step))
        if self.state.consecutive_nonfinite:
            self.diverged(step, "the last step's loss or gradient, or the held-out loss, is not finite")
        self.save(step)  # the final checkpoint: resume of a finished run is a no-op
        # final/ is a plain Hugging Face folder however it was trained: sharded, gathered first
        whole = dist.saved_state(self.model) if self.t.sharded_units else None
        if self.accelerator.is_main_process:
            save_final(Path(self.args.output_dir) / "final", whole)
        self.accelerator.wait_for_everyone()


def fit(model, method: Method, train_items: list, eval_items: list, lengths: list[int], args: LoopArgs, *,
        accelerator, save_final: Callable[[Path, dict | None], None], resume: bool = False,
        processed_tokens: Callable[[dict], tuple[int, int]] | None = None,
        log_to: Callable[[dict], None] | None = None, on_start: Callable[[int], None] | None = None) -> FitResult:
    """Train ``model`` (a transformers/PEFT causal LM) with ``method`` on ``train_items``.

    ``lengths[i]`` is item i's token count (for length grouping); ``processed_tokens(batch)``
    returns (real tokens, processed tokens incl. padding) for throughput and efficiency;
    ``log_to(record)`` receives every metrics.jsonl record on the main process (trackers);
    ``on_start(step)`` is called once training can begin — after a resume's checks passed
    and its checkpoint loaded (``step``: the checkpoint's; 0 for a fresh run), before
    metrics.jsonl is touched and before step 1 (the trackers' runs start there).
    """
    from tunesmith.train import memory

    is_main = accelerator.is_main_process
    plan = _plan(len(train_items), args, accelerator.num_processes)
    t = _set_up(model, method, args, plan, accelerator)
    if is_main and (t.sharded_units or accelerator.num_processes > 1):
        console.info("distributed: " + dist.describe(accelerator.num_processes, t.sharded_units))
    step, state, forced = _resume(model, t, args, plan, accelerator) if resume else (0, TrainerState(), [])
    if on_start is not None:
        on_start(step)
    log = _MetricsLog(Path(args.output_dir), is_main, resumed_at=step if resume else None, log_to=log_to)
    run = _Run(model, method, eval_items, args, plan, accelerator, t, state, log)
    t.module.train()
    mem_before = 0
    batches_of = _Batches(method, train_items, lengths, args, plan, accelerator)
    window, totals, stopped = _Window(), [0, 0], False
    # The handlers stay through the final eval and save: a signal then lets them finish.
    with _Stop() as stop, _progress(is_main, plan.total, step) as progress:
        if eval_items and step == 0 and args.eval_steps > 0:
            ev = run.evaluate(0)  # the baseline every later eval_loss is compared with
            if is_main:
                console.info("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        mem_before = memory.reset_peak(accelerator.device.type)  # measure the training steps, not the loading
        while step < plan.total:
            batches = batches_of(step)
            s = _optimizer_step(method, t, batches, args, accelerator)
            _count_tokens(method, batches, window, totals, processed_tokens)
            step += 1
            run.record_step(step, s, window, progress)
            if eval_items and args.eval_steps > 0 and step % args.eval_steps == 0 and step != plan.total:
                ev = run.evaluate(step)
                run.last_metrics.update(ev)
                progress.update(step, ev)
            if args.save_steps > 0 and step % args.save_steps == 0 and step != plan.total:
                run.save(step)
            if _reduce_sum(accelerator, [1.0 if stop.flag else 0.0])[0] > 0 and step != plan.total:
                run.save(step)
                stopped = True
                if is_main:
                    console.info(f"{stop.name or 'a signal'}: checkpoint saved at step {step}; continue with "
                                 f"--resume")
                break
        if not stopped:
            run.finish(step, save_final)
    efficiency = totals[0] / totals[1] if totals[1] else 1.0
    peak, peak_kind = memory.peak_bytes(accelerator.device.type)
    measured = dist.gather(accelerator, (peak, t.state_bytes))
    return FitResult(step, run.last_metrics, stopped, stop.name if stopped else None, forced, state.skipped,
                     efficiency, peak, peak_kind, max(0, peak - mem_before), [m[0] for m in measured],
                     [m[1] for m in measured], t.sharded_units)


class _progress:
    """A rich progress bar on the main process (loss, tokens/s, ETA); silent elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=console.console, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if self.bar is None:
            return
        parts = []
        for k in ("loss", "eval_loss", "tokens_per_second"):
            if rec.get(k) is not None:
                parts.append(f"{k.replace('tokens_per_second', 'tok/s')} {rec[k]:.4g}")
        self.bar.update(self.task, completed=step, info="  ".join(parts))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
