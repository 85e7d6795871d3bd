"""The house rules of docs/architecture.md, checked on the code itself: imports of our own modules sit
at the top of a module (the command modules aside), imports point down the wings, no file outgrows
400 lines. A change that breaks one fails here, naming the file and line."""
import ast

import pytest

from tests.conftest import ROOT

OWN = ("heads", "cache", "pipeline")
# The typer faces may import their implementation inside a command, so --help stays fast.
COMMAND_MODULES = {"cli.py", "heads/commands.py", "heads/commands_runs.py", "cache/commands.py", "pipeline/commands.py"}
# Which wing may import which (docs/architecture.md); a wing always may import itself.
MAY_IMPORT = {
    "heads.commands": None, "heads.commands_runs": None, "heads.command_options": set(),
    "heads.sweeps": {"heads.train", "heads.methods", "heads.blocks", "heads.reports", "heads.metrics", "heads.errors", "cache"},
    "heads.train": {"heads.methods", "heads.blocks", "heads.reports", "heads.metrics", "heads.errors", "cache"},
    "heads.methods": {"heads.blocks", "heads.metrics", "heads.errors"},
    "heads.blocks": {"heads.metrics", "heads.errors", "cache"},
    "heads.reports": {"heads.metrics", "heads.errors"},
    "heads.metrics": set(), "heads.errors": set(), "heads.__init__": set(),
    "cache": set(), "pipeline": {"cache"},
}


def sources():
    for package in OWN:
        yield from sorted((ROOT / package).rglob("*.py"))
    yield ROOT / "cli.py"


def own_imports(tree):
    """``(node, module, inside_a_function)`` for every import of our own packages."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in OWN:  # from heads import metrics
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.split(".")[0] in OWN:
                yield node, name, id(node) in inside


def wing(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "heads" and len(parts) > 1 else parts[0]


def test_no_function_level_import_of_our_own_modules():
    found = []
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel in COMMAND_MODULES:
            continue
        for node, name, inside in own_imports(ast.parse(path.read_text())):
            if inside:
                found.append(f"{rel}:{node.lineno} imports {name} inside a function")
    assert not found, "\n".join(found)


def test_imports_point_down_the_wings():
    found = []
    for path in sources():
        rel = path.relative_to(ROOT)
        if rel.as_posix() == "cli.py":
            continue
        here = wing(".".join(rel.with_suffix("").parts))
        allowed = MAY_IMPORT[here]
        if allowed is None:  # a command module: anything below it
            continue
        for node, name, _ in own_imports(ast.parse(path.read_text())):
            there = wing(name)
            if there != here and there not in allowed:
                found.append(f"{rel}:{node.lineno}: {here} imports {name} ({there} is not below it)")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", ["heads", "cache", "pipeline", "benchmarks"])
def test_no_source_file_over_400_lines(folder):
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, ", ".join(long)


def test_cli_face_is_thin():
    assert len((ROOT / "cli.py").read_text().splitlines()) <= 120
