"""Device, dtype and thread choices, and the reason for each (``tunesmith env``).

bf16 is chosen only where it is fast: CUDA devices with native bf16 (compute capability
>= 8.0), or CPUs where oneDNN has a bf16 path (AVX512-BF16 / AMX). On a CPU without it,
bf16 autocast is emulated and measured 11-17x slower than fp32, so fp32 is the default.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from tunesmith.errors import TunesmithError


@dataclass
class Hardware:
    device: str                     # "cuda" or "cpu"
    device_name: str
    threads: int                    # torch intra-op threads we use
    cores: int
    bf16_fast: bool
    bf16_reason: str
    memory_gib: float               # host RAM (CPU) or device memory (CUDA)
    cpu_flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
                    return [x for x in flags if x in keep]
    except OSError:
        pass
    return []


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def available_memory_gib() -> float:
    """Memory the kernel can hand out now (``MemAvailable`` of /proc/meminfo), else the host's total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return _host_memory_gib()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def detect() -> Hardware:
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        fast = torch.cuda.is_bf16_supported()
        reason = f"CUDA compute capability {major}.{minor} " + ("has native bf16" if fast else "lacks native bf16 (needs >= 8.0)")
        props = torch.cuda.get_device_properties(idx)
        return Hardware("cuda", torch.cuda.get_device_name(idx), torch.get_num_threads(), cpu_cores(),
                        fast, reason, props.total_memory / 2**30, _cpu_flags())
    try:
        fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast = False
    reason = ("oneDNN has a native bf16 path on this CPU" if fast
              else "this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be emulated, 11-17x slower")
    return Hardware("cpu", _cpu_name(), torch.get_num_threads(), cpu_cores(), fast, reason,
                    _host_memory_gib(), _cpu_flags())


def choose_dtype(requested: str, hw: Hardware) -> tuple[torch.dtype, str]:
    """The compute dtype for training/inference and why. ``requested`` is auto|fp32|bf16|fp16."""
    if requested == "fp32":
        return torch.float32, "fp32 requested"
    if requested == "bf16":
        why = "bf16 requested" + ("" if hw.bf16_fast else " (warning: emulated on this hardware, slow)")
        return torch.bfloat16, why
    if requested == "fp16":
        return torch.float16, "fp16 requested"
    # auto: bf16 autocast (fp32 master weights) wherever it is native. Measured on the
    # 2-core AMX Xeon here, SmolLM2-135M LoRA, batch 8 x 128 tokens: fp32 ~265 tokens/s,
    # bf16 autocast ~395 tokens/s (1.5x). Without native bf16 it is emulated: 11-17x slower.
    if hw.bf16_fast:
        return torch.bfloat16, f"auto: bf16 autocast with fp32 weights ({hw.bf16_reason})"
    return torch.float32, f"auto: fp32 ({hw.bf16_reason})"


def set_threads(threads: int | None) -> int:
    """threads = cores by default (torch's own default can count hyper-threads)."""
    n = threads or cpu_cores()
    if n < 1:  # torch.set_num_threads(-1) is a RuntimeError deep inside a run
        raise TunesmithError(f"threads = {n} is invalid: use a positive number of CPU threads, or leave "
                             "train.threads out to use every core")
    torch.set_num_threads(n)
    return n


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "trl", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out
