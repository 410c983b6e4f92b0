"""README and --help agree; every example runs and checks itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kfac_cli.cli import app
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
COMMANDS = [
    "layers",
    "patches",
    "canonicalize",
    "factors",
    "merge",
    "info",
    "stats",
    "apply",
    "export",
]


def help_text(command: str) -> str:
    """``kfac-cli COMMAND --help`` as README shows it (100 columns)."""
    result = CliRunner().invoke(
        app, [command, "--help"], terminal_width=100, env={"COLUMNS": "100"}
    )
    assert result.exit_code == 0
    return result.stdout.rstrip()


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_reference_matches_help(command):
    block = re.search(
        rf"```text\n\$ kfac-cli {command} --help\n(.*?)\n```", README, flags=re.DOTALL
    )
    assert block, f"README has no `kfac-cli {command} --help` block"
    assert block.group(1).rstrip() == help_text(command), (
        f"README's {command} reference is stale; regenerate it with "
        f"`python -m tests.test_docs {command}`"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_is_a_manual(command):
    text = help_text(command)
    assert "Examples:" in text and "$ kfac-cli " + command in text


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^python3 -m venv .*pytest.*$", ci, flags=re.MULTILINE).group(0)
    assert f"```sh\n{command}\n```" in README


def test_ruff_clean():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([str(ruff), "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("index", [0, 1])
def test_readme_python_blocks_run(index, tmp_path):
    """README's Python examples, as they stand, in a fresh folder."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert len(blocks) == 3  # the recording example above is the third's short form
    code = [b for b in blocks if "assert" in b or "generator" in b][index]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        "quickstart.py",
        "record_activations.py",
        "record_shards.py",
        "kfac_step.py",
        "plot_factor.py",
        "ekfac_shards.py",
        "curvature_workflows.py",
        "interop.py",
    ],
)
def test_example_runs_and_checks_itself(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pipeline.sh", "distributed.sh"])
def test_shell_example(tmp_path, script):
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **__import__("os").environ,
            "PATH": f"{Path(sys.executable).parent}:" + __import__("os").environ["PATH"],
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


if __name__ == "__main__":
    for cmd in sys.argv[1:] or COMMANDS:
        print(f"```text\n$ kfac-cli {cmd} --help\n{help_text(cmd)}\n```\n")
