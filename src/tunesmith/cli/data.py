"""``tunesmith data check|convert|inspect`` (placeholder, being written)."""

import typer

app = typer.Typer(help="Check, convert and inspect datasets.", no_args_is_help=True)
