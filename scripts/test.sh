#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (what .ci/run calls).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report is tested in a real browser: Debian's headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test of the report will be skipped" >&2
  else
    echo "warning: chromium is not installed; the browser test of the report will be skipped" >&2
  fi
fi
# --durations: the slowest tests at the end of every run, to keep the suite under its 30 minutes
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
