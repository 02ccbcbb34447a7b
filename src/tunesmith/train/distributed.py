"""How several processes train one model (``train.distributed``): DDP, or FSDP2 sharding.

    torchrun --nproc_per_node 2 -m tunesmith train CONFIG.yaml        # train.distributed: fsdp2

``ddp`` (the default) keeps a whole copy of the weights, gradients and AdamW moments in every
process and averages gradients (``accelerate``'s ``prepare_model``). ``fsdp2`` shards them:
PyTorch's own ``fully_shard`` on each decoder layer and on the method's forward wrapper (the
root: embeddings, final norm, LM or score head), so each process holds 1/N of every tensor, a
layer's full weights exist only while it runs (all-gathered, freed after its forward and its
backward), and gradients are reduce-scattered to their shards.

Why we call ``fully_shard`` ourselves instead of ``accelerate``'s FSDP plugin: with
``use_cpu: true`` accelerate silently runs an FSDP config as DDP (``MULTI_CPU``; the model
comes back as ``DistributedDataParallel``), so on a CPU it would report sharding that did not
happen; ``fully_shard`` shards the same way on CPU/gloo, where the tests run it, and on
CUDA/nccl. The policy is the one accelerate's ``TRANSFORMER_BASED_WRAP`` applies (one unit a
decoder layer, the rest in the root); an ``accelerate launch`` with an FSDP config and
``train.distributed: fsdp2`` gets this policy — the config's own ``fsdp_config`` (wrap policy,
offload, reshard) is not read, as the start-up line says — and with ``ddp`` it is refused.

Gradient accumulation reduce-scatters every micro-batch's gradients (no ``no_sync``): with
gradient sync off FSDP2 keeps every layer's gradients unsharded until the step's last
micro-batch, which would hold whole gradients on each process.

Checkpoints stay today's format (``train/checkpoint.py``): every process takes part in
gathering the trainable tensors and their AdamW moments into full tensors, and rank 0 writes
them. Why not ``torch.distributed.checkpoint``: its default metadata file is a pickle, which a
resume must never load; its Hugging Face storage writer covers model weights, not the optimizer
state. Gathering keeps the one safetensors + JSON format, its sha256 manifest and atomic
rename, and makes re-sharding free: a resume takes each process's slice of the full tensors, so
it works at any process count (with the same global batch) and from or to a single process.
The cost: a save passes the whole trainable state (weights + 2 moments, 12 bytes a trained
parameter) through rank 0's memory (the others hold one gathered tensor at a time); a model whose trainable state does not fit one host needs
per-process shard files, which this does not write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt

def _launched_with(engine: str) -> bool:
    """Whether ``accelerate launch`` was given an FSDP or DEEPSPEED config (it says so in the
    environment: ``ACCELERATE_USE_<ENGINE>``)."""
    return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true")


def accelerate_asks_fsdp() -> bool:
    return _launched_with("FSDP")


def check(strategy: str, method: str, qlora: bool) -> None:
    """The refusals that need no weights."""
    if _launched_with("DEEPSPEED"):
        # accelerate's prepare_model does not wrap a model in DeepSpeed (only prepare() with the
        # optimizer does), so under a DeepSpeed config nothing would be sharded
        raise TunesmithError("accelerate launch was given a DeepSpeed config, which tunesmith's training loop does "
                             "not run under; set train.distributed: fsdp2 (weights, gradients and optimizer "
                             "sharded, as ZeRO-3) or ddp, and launch with torchrun or a DDP/FSDP config")
    if accelerate_asks_fsdp() and strategy != "fsdp2":
        raise TunesmithError("accelerate launch was given an FSDP config, but train.distributed is "
                             f"{strategy!r} (on a CPU accelerate would quietly run it as DDP); set "
                             "train.distributed: fsdp2 — tunesmith shards with FSDP2 itself — or launch "
                             "with a DDP config")
    if strategy == "fsdp2" and method == "grpo":
        raise TunesmithError("GRPO under train.distributed: fsdp2 is not supported yet: its sampling decodes "
                             "from the whole policy's weights at every token, which FSDP2 holds in shards; use "
                             "train.distributed: ddp for GRPO on several processes")
    if strategy == "fsdp2" and qlora:
        raise TunesmithError("QLoRA under train.distributed: fsdp2 is not supported: its 4-bit base weights are "
                             "bitsandbytes tensors that FSDP2 cannot shard here; use train.distributed: ddp")


def describe(world: int, sharded_units: int) -> str:
    """The start-up line's words for what is (not) sharded."""
    if sharded_units:
        note = "; accelerate's fsdp_config is not read (its wrap, offload and reshard settings)" \
            if accelerate_asks_fsdp() else ""
        return (f"FSDP2 over {world} process{'es' if world > 1 else ''}: {sharded_units} units sharded "
                f"({sharded_units - 1} decoder layers + the root), each process holds 1/{world} of the "
                f"weights, gradients and optimizer state (the root's weights whole during a step, one layer's "
                f"while it runs){note}")
    return f"DDP over {world} processes: each holds whole weights, gradients and optimizer state"


# ---------------------------------------------------------------- sharding


def _layers(model: nn.Module) -> list[nn.Module]:
    from tunesmith.models.compile import decoder_layers

    layers = decoder_layers(model)
    if layers is None:  # a sequence-classification model (reward): its transformer's layers
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = getattr(getattr(base, "base_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TunesmithError(f"train.distributed: fsdp2 found no decoder layers in {type(model).__name__} to shard; "
                             f"use train.distributed: ddp for this model")
    return list(layers)


def _ensure_group(device: torch.device) -> None:
    """A process group even for one process (FSDP2 on one GPU, or one CPU process)."""
    group = torch.distributed
    if group.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:  # torchrun with one process
        group.init_process_group(backend)
    else:
        group.init_process_group(backend, store=group.HashStore(), rank=0, world_size=1)


def shard(module: nn.Module, model: nn.Module, device: torch.device) -> int:
    """``fully_shard`` each decoder layer of ``model``, then ``module`` (the method's wrapper
    around it, whose forward is what the engine calls) as the root; returns the units sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module.to(device)
    _ensure_group(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = _layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return len(layers) + 1


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it), a plain one as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def full_state(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: whole tensor on CPU} on rank 0 (every process takes part in each gather, one tensor
    at a time, and only rank 0 keeps it: ``{}`` elsewhere); a tensor reached under two names
    (tied embeddings) is gathered once and shared, so savers see the tie."""
    keep = _rank0()
    seen: dict[int, torch.Tensor | None] = {}
    out = {}
    for name, t in named:
        if id(t) not in seen:
            whole = full(t.detach())
            seen[id(t)] = whole.cpu() if keep else None
        out[name] = seen[id(t)]
    return out if keep else {}


def full_optimizer_state(state: Any) -> Any:
    """An optimizer's ``state_dict()`` with every shard gathered, kept on rank 0 (the structure is
    the same on every process, so the collectives pair up; elsewhere the tensors are dropped)."""
    keep = _rank0()

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, torch.Tensor):
            whole = full(x)
            return whole.cpu() if keep else None
        return x

    return walk(state)


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``final/`` needs, gathered on rank 0: a full model's whole state dict; for a PEFT
    model only what its ``save_pretrained`` picks out — the trained tensors and the input and
    output embeddings (saved when the vocabulary was resized) — not the frozen base."""
    named = model.state_dict(keep_vars=True).items()  # keep_vars: tied names share one Parameter
    if hasattr(model, "peft_config"):
        wanted = {id(p) for p in model.parameters() if p.requires_grad}
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            wanted |= {id(p) for p in (layer.parameters() if layer is not None else ())}
        named = [(n, t) for n, t in named if id(t) in wanted]
    return full_state(named)


def _slice_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` (whole) as a tensor sharded the way ``param`` is (each process keeps its slice)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)  # every process holds ``t``: no communication


def copy_into(param: torch.Tensor, t: torch.Tensor) -> None:
    """Load the whole tensor ``t`` into ``param``, sharded or not."""
    if _is_dtensor(param):
        param.to_local().copy_(_slice_like(t, param).to_local())
    else:
        param.copy_(t)


def optimizer_state_for(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved (whole) optimizer state made to fit ``optimizer``'s sharded parameters: each
    moment shaped like its parameter becomes a shard of it; scalars (``step``) stay."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(_is_dtensor(p) for p in params):
        return state
    out = dict(state)
    out["state"] = {}
    for key, entry in state["state"].items():
        p = params[int(key)]
        out["state"][key] = {k: _slice_like(v, p) if isinstance(v, torch.Tensor) and _is_dtensor(p)
                             and tuple(v.shape) == tuple(p.shape) else v for k, v in entry.items()}
    return out


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The gradients' global norm (over every process's shards when sharded), and the gradients
    clipped to ``max_norm`` when it is > 0."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(full(norm))


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every parameter (every shard of it) is finite, agreed by all processes: one fused
    reduction per tensor, ~1 ms for a LoRA adapter, ~0.1 s for all 135M weights of SmolLM2."""
    ok = all(bool(torch.isfinite(local(p)).all()) for p in params)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return ok
    bad = torch.tensor([0.0 if ok else 1.0], device=local(params[0]).device if params else "cpu")
    torch.distributed.all_reduce(bad)  # on the parameters' device: nccl has no CPU tensors
    return bad.item() == 0.0


def state_bytes(module: nn.Module, trainable: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds of the weights (all of ``module``'s), the gradients and the
    optimizer state (of the trained ones): only its own shards, counted from the tensors
    themselves (call it between the backward and ``zero_grad``)."""
    def size(t):
        t = local(t)
        return t.numel() * t.element_size()

    moments = sum(size(v) for p in trainable for v in optimizer.state.get(p, {}).values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"weights": sum(size(p) for p in module.parameters()),
            "gradients": sum(size(p.grad) for p in trainable if p.grad is not None), "optimizer": moments}


# ---------------------------------------------------------------- what the processes share


def gather(accelerator, value: Any) -> list:
    """``value`` of every process, by rank (in memory, between our own processes)."""
    if accelerator.num_processes == 1:
        return [value]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, value)
    return out


def rng_of_every_process(accelerator) -> dict:
    """This process's RNG state, with every other process's under ``other_processes`` (rank
    order) on rank 0, so that each process resumes its own generator where it stopped."""
    states = gather(accelerator, ckpt.capture_rng())
    return states[0] if len(states) == 1 else {**states[0], "other_processes": states[1:]}


def rng_of_this_process(state: dict, accelerator) -> dict:
    """The saved RNG state of this rank; a rank the checkpoint did not have (a resume on more
    processes) takes rank 0's, as every rank's generator starts from the one seed anyway."""
    others, rank = state.get("other_processes") or [], accelerator.process_index
    return others[rank - 1] if 0 < rank <= len(others) else state


def agree_on_checkpoint(accelerator, newest: Path | None, out: Path) -> None:
    """Every process must resume from the same step: nodes that see different run folders
    (no shared file system) are refused before anything loads."""
    steps = gather(accelerator, ckpt.step_of(newest) if newest is not None else None)
    if len(set(steps)) > 1:
        raise TunesmithError(
            f"--resume: the {len(steps)} processes see different newest checkpoints in {out} (steps by rank: "
            f"{steps}); the run folder must be on a file system every node shares")
