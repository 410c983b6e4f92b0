"""What a reviewer checks by reading, mechanised: the repository stands on its own, its
dependencies are honest, its layers do not import upwards or in circles, and only the
command line speaks in flags."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

PACKAGE = ROOT / "kfac_cli"
# Each package layer may import only what is below it.
LAYERS = ["errors", "enums", "ops", "files", "models", "jobs", "record", "cli"]


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(f.relative_to(ROOT).with_suffix("").parts): ast.parse(f.read_text())
        for f in PACKAGE.rglob("*.py")
    }


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_file_points_outside_the_repository():
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *PACKAGE.rglob("*.py")]
    files += [f for f in ROOT.glob("examples/*") if f.is_file()]
    for f in files:
        text = f.read_text()
        assert "../shared" not in text and "SPEC.md" not in text, f
        assert "github.com/kfac-cli" not in text, f


def test_every_runtime_dependency_is_imported():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in deps}
    imported = {m.split(".")[0] for tree in _modules().values() for m in _imports(tree)}
    # numpy: torch warns on every import without it, and users write dumps with it.
    assert names - {"numpy"} <= imported, names - imported


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return LAYERS.index(name) if name in LAYERS else -1


def test_no_import_runs_up_the_layers_or_in_a_circle():
    modules = _modules()
    graph = {
        m: {i for i in _imports(t) if i in modules and i != m and not i.endswith("__init__")}
        for m, t in modules.items()
        if not m.endswith("__init__") and m != "kfac_cli.__main__"
    }
    for m, targets in graph.items():
        for t in targets:
            if _layer(m) >= 0 and _layer(t) >= 0:
                assert _layer(t) <= _layer(m), f"{m} imports {t}, a layer above it"
    seen: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in graph.get(m, ()):
            assert seen.get(t) != 1, f"import circle: {' -> '.join([*path, t])}"
            if t not in seen:
                visit(t, [*path, t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])


def test_only_the_command_line_names_the_flags_that_fix_errors():
    """The library names the keyword that fixes an error (``fix="force"``); the CLI turns
    it into a flag. (``kfac-cli layers --json``, where a spec comes from, is no such flag.)"""
    options = "keep-untreated|ignore-unknown|unsafe-trust-pickle|separate-bias|treated-only"
    flag = re.compile(rf"--(?:{options}|device|dtype|force|spec|strict|columns|batch-first)\b")
    for f in PACKAGE.rglob("*.py"):
        if f.name != "cli.py":
            assert not flag.findall(f.read_text()), (f, flag.findall(f.read_text()))
