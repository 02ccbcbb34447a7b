#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (what .ci/run calls).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
