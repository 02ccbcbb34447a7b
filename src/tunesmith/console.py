"""The one place user-facing output goes through (nothing below cli prints directly).

Tests and ``--json`` modes capture output by swapping ``console`` for a recording one.
Messages go to stderr so that stdout stays clean for machine-readable output.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)  # stdout: reports, tables, JSON


def info(msg: str) -> None:
    console.print(escape(msg))


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(msg)}")


def error(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")


def is_tty() -> bool:
    return sys.stdout.isatty()
