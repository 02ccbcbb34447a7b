"""The house rules, read from the code's own imports (function-local ones included): data
flows one way, and no function grows past a page.

    cli → pipeline → {train, evaluate, export} → infer → {data, models, files, hardware, config}

(``export`` and ``evaluate`` stand beside each other; ``train`` may use ``infer`` for
GRPO's reward models and its sampling; ``quickstart`` is reached from ``cli`` only.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"

# (importer room, imported room) pairs that must never occur.
FORBIDDEN = {
    ("evaluate", "train"), ("export", "train"), ("export", "evaluate"),
    ("train", "evaluate"), ("train", "export"),
    ("models", "data"), ("models", "train"), ("models", "evaluate"), ("models", "infer"),
    ("models", "export"), ("models", "pipeline"),
    ("data", "models"), ("data", "train"), ("data", "evaluate"), ("data", "export"), ("data", "infer"),
    ("infer", "train"), ("infer", "evaluate"), ("infer", "export"), ("infer", "pipeline"),
}
LONGEST_FUNCTION = 80  # lines
FACT_TABLES = {"quickstart/data.py"}  # the quickstart's generated facts: data written as code


def room(path: Path) -> str:
    """A module's room: its top folder under tunesmith/, or the module's own name."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, tunesmith.module) of every import in the file (or ``text`` as if it were that
    file), at any depth."""
    tree = ast.parse(text if text is not None else path.read_text(encoding="utf-8"))
    package = ".".join(("tunesmith", *path.relative_to(SRC).parent.parts))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("tunesmith")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("tunesmith"):
                # `from tunesmith import console` imports the module tunesmith.console
                out += [(node.lineno, f"{name}.{a.name}" if name == "tunesmith" else name) for a in node.names]
    return out


def target_room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


SOURCES = sorted(p for p in SRC.rglob("*.py"))


def test_the_rules_see_every_room():
    rooms = {room(p) for p in SOURCES}
    assert {"cli", "data", "models", "infer", "train", "evaluate", "export", "quickstart", "pipeline", "files",
            "config"} <= rooms
    # the reader finds function-local imports too
    assert ("tunesmith.infer.load" in {m for _, m in imports(SRC / "cli" / "package.py")})


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(SRC).as_posix())
def test_imports_flow_one_way(path):
    here = room(path)
    bad = []
    for line, module in imports(path):
        there = target_room(module)
        if (here, there) in FORBIDDEN:
            bad.append(f"{path.relative_to(SRC)}:{line} ({here} → {there}: {module})")
        if there == "cli" and here != "cli" and here != "__main__":
            bad.append(f"{path.relative_to(SRC)}:{line} imports the CLI ({module})")
        if there == "quickstart" and here not in ("cli", "quickstart"):
            bad.append(f"{path.relative_to(SRC)}:{line} imports the quickstart ({module}); only cli may")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("path", [p for p in SOURCES if p.relative_to(SRC).as_posix() not in FACT_TABLES],
                         ids=lambda p: p.relative_to(SRC).as_posix())
def test_no_function_is_longer_than_a_page(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{n.name} at line {n.lineno}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > LONGEST_FUNCTION]
    assert not long, f"{path.relative_to(SRC)}: " + "; ".join(long)


def test_the_rules_would_catch_a_violation():
    """The reader is not vacuous: an `evaluate → train` import written three ways is found."""
    probe = SRC / "evaluate" / "probe.py"  # read from the text below, never written
    text = ("from tunesmith.train.engine import fit\n"
            "def f():\n    import tunesmith.train.recipe\n"
            "def g():\n    from ..train import methods\n")
    found = imports(probe, text)
    assert [line for line, _ in found] == [1, 3, 5]
    assert all((room(probe), target_room(m)) in FORBIDDEN for _, m in found)
