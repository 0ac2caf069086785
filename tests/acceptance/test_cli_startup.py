"""Start-up stays light: `--help`, `--version` and shell completion import no PyTorch,
asyncpg or NumPy (each command imports what it needs when it runs). A fresh interpreter
is the only place that can tell, hence subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO

HEAVY = ("torch", "torchvision", "numpy", "asyncpg", "PIL", "tensorboard", "huggingface_hub")


def run_importtime(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI under ``python -X importtime`` (it reports every import on stderr)."""
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "ganns_async", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


def imported(r: subprocess.CompletedProcess[str]) -> set[str]:
    """Top-level package names from ``python -X importtime`` (on stderr)."""
    names = set()
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_imports_nothing_heavy() -> None:
    r = run_importtime("--help")
    assert r.returncode == 0, r.stderr[-2000:]
    found = imported(r)
    assert "typer" in found  # the parse worked: a real importtime listing
    assert not found & set(HEAVY), sorted(found & set(HEAVY))
    for option in ("--version", "--install-completion", "--show-completion"):
        assert option in r.stdout


@pytest.mark.parametrize(("words", "cword", "expected"), [
    ("ganns-async co", 1, {"coordinator", "control"}),
    ("ganns-async worker --device c", 3, {"cpu", "cuda"}),
    ("ganns-async control ", 2, {"pause", "resume", "stop"}),
])
def test_completion_answers_without_heavy_imports(words: str, cword: int, expected: set[str]) -> None:
    """What `--install-completion` sets up: the shell runs the CLI with these variables on
    every <Tab>, so it must answer as fast as --help does."""
    r = run_importtime(env={"_GANNS_ASYNC_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(r.stdout.split()) == expected
    assert not imported(r) & set(HEAVY)
