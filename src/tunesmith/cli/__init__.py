"""The ``tunesmith`` command: thin commands that parse, validate and call one recipe.

Every user-fixable problem arrives as a ``TunesmithError`` and is printed as one
sentence (no traceback) with exit code 1; ``TUNESMITH_DEBUG=1`` shows the traceback.
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


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        # standalone_mode=False returns a command's `typer.Exit(code)` instead of exiting.
        rv = app(args=argv, standalone_mode=False)
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
    except Exception as err:  # click usage errors and friends
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise
