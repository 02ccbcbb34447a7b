"""torch.compile of the decoder layers for training (``train.compile: auto|on|off``).

Why the layers and not the whole model: every decoder layer of a transformers causal LM runs
the same code on same-shaped weights, so with the layer's weights as graph inputs (dynamo's
default ``inline_inbuilt_nn_modules``) inductor compiles one layer's forward and backward and
its FX graph cache serves the other layers; the embedding, tunesmith's own LM-head call
(``models/forward.py``), the loss and the fused optimizer stay eager. Sequence length and batch
size are dynamic from the start (``dynamic=True``): one compile serves every batch of a run.
Compiled with static shapes instead, each new batch length cost ~20 s of compiling for a
step ~15% faster still; padding lengths to a multiple would spend that on padding.

What inductor writes (generated C++, compiled kernels, FX and AOT graphs) is kept under
``$TUNESMITH_HOME/compile`` instead of ``/tmp``, so a later run of the same model pays dynamo's
tracing and a cache lookup, not the compilation.

Measured here (SmolLM2-135M, LoRA r=8 all-linear, bf16 autocast, batch 8 x 112-136 tokens,
2-core AMD EPYC with AVX512-BF16, one process per row, steps 2-7): with LoRA dropout 0, eager
3.85-4.85 s a step (mean 4.16), compiled 2.97-4.31 s (mean 3.52, 1.18x), the first step 41 s
cold (eager 4.4 s); with dropout 0.05, no gain (mean 4.16 compiled against 4.09 eager): the
seven masks a layer draws stay opaque to inductor and its fusion around them saves nothing. So
``auto`` compiles what was measured to pay — LoRA SFT without dropout, DoRA, QLoRA or packing,
bf16 autocast on a CPU, one process — for runs long enough to repay a cold compile about three
times (``AUTO_MIN_STEPS``); ``on`` compiles wherever asked. A run compiles each variant of a
layer's call it meets once (gradients on or off, a padded batch's mask or none, the adapter on
or off), each cached.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tunesmith.errors import TunesmithError

AUTO_MIN_STEPS = 200  # at ~0.6 s saved a step, 200 steps repay a ~40 s cold compile three times


def cache_dir():
    from tunesmith.models.load import tunesmith_home

    return tunesmith_home() / "compile"


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of layers, through a PEFT wrapper; None when it has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU code needs, or None when there is none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler (no g++/clang++ on PATH)
        return None


def choose(setting, *, model, method: str, plain_lora: bool, device: str, dtype, steps: int,
           world: int, sharded: bool = False) -> tuple[bool, str]:
    """(compile the layers?, why) for ``train.compile`` (auto, on or off); refuses what cannot be
    compiled. ``plain_lora``: a LoRA adapter without dropout, DoRA, QLoRA or packing (what was
    measured to pay); ``sharded``: FSDP2 will shard the layers (not measured compiled)."""
    if setting == "off":
        return False, "off"
    if decoder_layers(model) is None:
        if setting == "on":
            raise TunesmithError(f"train.compile: on needs a decoder with a list of layers; {type(model).__name__} "
                                 "has none: set train.compile: off")
        return False, "auto: off (the model has no list of decoder layers)"
    if world > 1 or sharded:
        what = f"{world} processes" if world > 1 else "train.distributed: fsdp2"
        if setting == "on":
            raise TunesmithError(f"train.compile: on is not supported with {what} yet: set "
                                 "train.compile: off (or auto) for a multi-process or sharded run")
        return False, f"auto: off ({what})"
    # the C++ compiler is looked for only where the layers would compile, not at every start-up
    if device == "cpu" and setting == "on" and _cpp_compiler() is None:
        raise TunesmithError("train.compile: on needs a C++ compiler for inductor's CPU code and none was found: "
                             "install g++ (or set CXX), or set train.compile: off")
    if setting == "on":
        return True, "on"
    if device != "cpu" or dtype != torch.bfloat16:
        return False, "auto: off (measured faster for bf16 autocast on a CPU only; set on to compile here)"
    if method != "sft" or not plain_lora:
        # DPO measured 1.28x a step (median), but its reference pass is a second graph (no grad, the
        # adapter off): in bf16 it rounds apart from the policy's, so the implicit rewards do not
        # start at exactly 0, and each new variant (with or without padding) compiles mid-run.
        what = method if method != "sft" else "this adapter, its dropout or packing"
        return False, f"auto: off (measured to pay for LoRA SFT without dropout; set on to compile {what})"
    if steps < AUTO_MIN_STEPS:
        return False, (f"auto: off ({steps} steps; compiling measured ~1.18x a step for ~40 s once, worth it from "
                       f"{AUTO_MIN_STEPS} steps; set on to compile)")
    if _cpp_compiler() is None:
        return False, "auto: off (no C++ compiler for inductor)"
    return True, f"auto: {steps} steps >= {AUTO_MIN_STEPS}, measured ~1.18x a step here"


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer in place (``nn.Module.compile``: parameter names and the
    saved state dict are unchanged); returns how many were compiled."""
    import torch._dynamo

    layers = decoder_layers(model)
    if layers is None:
        return 0
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    # One dynamo cache entry per layer instance and mode (training, no-grad evaluation, the adapter
    # disabled for a DPO reference): at dynamo's default limit (8 per code object) the ninth layer
    # onwards would silently run eager.
    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 8 * len(layers))
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 16 * len(layers))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
