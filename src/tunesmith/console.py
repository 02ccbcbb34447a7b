"""The one place user-facing output goes through (nothing below cli prints directly).

Tests and ``--json`` modes capture output by swapping ``console`` for a recording one.
Messages go to stderr so that stdout stays clean for machine-readable output. They carry
user data (file names, roles, record text), so they are escaped: never read as rich markup.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

# emoji=False: a role or text such as ":smile:" is data, not an emoji code.
console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
out = Console(highlight=False, soft_wrap=True, emoji=False)  # stdout: reports, tables, JSON


def info(msg: str) -> None:
    console.print(escape(msg))


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(msg)}")


def error(msg: str) -> None:
    console.print(f"[red]error:[/red] {escape(msg)}")


def is_tty() -> bool:
    return sys.stdout.isatty()
