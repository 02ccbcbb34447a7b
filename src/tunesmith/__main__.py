"""``python -m tunesmith`` == ``tunesmith`` (used by ``accelerate launch -m tunesmith``)."""

from tunesmith.cli import main

main()
