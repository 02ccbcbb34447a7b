"""The ``tunesmith`` command: thin commands that parse, validate and call one recipe.

Every user-fixable problem arrives as a ``TunesmithError`` and is printed as one
sentence (no traceback) with exit code 1; ``TUNESMITH_DEBUG=1`` shows the traceback.
A usage error (unknown option or command, missing argument) is one line too, exit code 2.
"""

from __future__ import annotations

import os
import sys

import typer

from tunesmith import console
from tunesmith.errors import TunesmithError

app = typer.Typer(
    help="tunesmith: data → SFT/LoRA → alignment → evaluation → export, on the hardware at hand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Sub-command modules register themselves on import; each owns one stage.
    from tunesmith.cli import data as _data  # noqa: F401
    from tunesmith.cli import evaluate as _evaluate  # noqa: F401
    from tunesmith.cli import pipeline as _pipeline  # noqa: F401
    from tunesmith.cli import score as _score  # noqa: F401
    from tunesmith.cli import package as _package  # noqa: F401
    from tunesmith.cli import system as _system  # noqa: F401
    from tunesmith.cli import train as _train  # noqa: F401

    app.add_typer(_data.app, name="data")


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, abort classes) of every click that typer may raise from.

    Recent typer (0.29 here) ships its own copy of click (``typer._click``) whose exceptions are not
    ``click``'s, while older typer raises ``click``'s own: catch both, whichever exist."""
    import importlib

    errors: list[type] = []
    aborts: list[type] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        errors.append(mod.ClickException)
        if isinstance(getattr(mod, "Abort", None), type):
            aborts.append(mod.Abort)
    return tuple(errors), tuple(aborts)


def _usage_error(err) -> str:
    """Click's message as one sentence that points at the right ``--help``."""
    msg = " ".join(err.format_message().split()).rstrip(".")
    ctx = getattr(err, "ctx", None)
    where = ctx.command_path if ctx is not None else "tunesmith"
    return f"{msg}; see `{where} --help` for usage"


def main(argv: list[str] | None = None) -> None:
    _register()
    click_errors, aborts = _click_exceptions()
    try:
        # standalone_mode=False returns a command's `typer.Exit(code)` instead of exiting;
        # prog_name keeps usage messages saying `tunesmith` under pytest or `python -m`.
        rv = app(args=argv, standalone_mode=False, prog_name="tunesmith")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except TunesmithError as err:
        if os.environ.get("TUNESMITH_DEBUG"):
            raise
        console.error(str(err))
        sys.exit(1)
    except typer.Exit as e:  # raised by commands that set their own exit code
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        console.error("interrupted")
        sys.exit(130)
    except click_errors as err:  # usage errors: unknown option or command, missing argument
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `tunesmith` / `tunesmith data`: the help
            err.show()
        else:
            console.error(_usage_error(err) if hasattr(err, "ctx") else err.format_message())
        sys.exit(err.exit_code)
    except aborts:
        sys.exit(1)
