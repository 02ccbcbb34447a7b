"""``tunesmith verify DIR``: reload an export in a fresh process, with no tunesmith code on
the load path, and check files, tokenizer and logits (see ``reload_check.py``).

A fresh interpreter (``python -I``: no PYTHONPATH, no user site, no current folder on
sys.path) is what a user of the folder has; loading it in this process would share
tunesmith's imports, patched environment and cached modules and could hide a problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith import console
from tunesmith.errors import TunesmithError

SCRIPT = Path(__file__).with_name("reload_check.py")
GGUF_SCRIPT = Path(__file__).with_name("gguf_check.py")  # a GGUF export: transformers' GGUF reader and llama.cpp


@dataclass
class VerifyResult:
    """``checks``: [{"name", "ok", "detail", "value"?}] in the order they ran."""

    ok: bool
    checks: list[dict]
    seconds: float

    def value(self, name: str):
        return next((c.get("value") for c in self.checks if c["name"] == name), None)


def verify_export(folder: str | Path, base: str | Path | None = None, timeout: float = 1800) -> VerifyResult:
    """Run the reload check on ``folder`` (``base``: where an adapter's base now lives, when
    it moved since export). Never raises for a failed check: read ``.ok``."""
    folder = Path(folder)
    if not (folder / "tunesmith.json").is_file():
        raise TunesmithError(f"{folder} is not a tunesmith export (no tunesmith.json); export a run with "
                             f"`tunesmith export RUN_DIR --format adapter|merged`")
    try:
        fmt = json.loads((folder / "tunesmith.json").read_text()).get("format")
    except (OSError, ValueError):
        fmt = None  # the script reports the unreadable manifest as its first check
    script = GGUF_SCRIPT if fmt == "gguf" else SCRIPT
    cmd = [sys.executable, "-I", str(script), str(folder)] + (["--base", str(base)] if base else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        return VerifyResult(False, [{"name": "reload", "ok": False, "detail": " | ".join(tail)}],
                            time.time() - started)
    got = json.loads(lines[-1])
    return VerifyResult(got["ok"], got["checks"], time.time() - started)


def report(result: VerifyResult) -> None:
    """One console line per check, then the verdict."""
    for c in result.checks:
        mark = "skip" if c.get("skipped") else "ok  " if c["ok"] else "FAIL"
        (console.info if c["ok"] else console.warn)(f"verify {mark} {c['name']}: {c['detail']}")
    names = {c["name"]: c["ok"] for c in result.checks}
    if names.get("files") is False:
        console.warn("verify stopped after the file check: the folder is not what was exported, so nothing was "
                     "loaded; export the run again")
    console.info(f"verify: {'passed' if result.ok else 'FAILED'} in {result.seconds:.1f} s (fresh process)")
