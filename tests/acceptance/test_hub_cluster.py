"""The Hub in a running cluster: workers fetch hf:// data, the coordinator pushes (or fails to) and trains on."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fakehub import FakeHub, _closed_port, _committed
from helpers import WIDTH, _fetch, _spawn, _stop, cli


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for subprocesses: a private Hub cache, no telemetry, no saved token."""
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "GANNS_NO_TUI": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    return env



def test_worker_trains_on_hf_data_and_coordinator_pushes(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                                          fake_hub: FakeHub, hub_env: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.files[("class/celeba", "data/faces.zip")] = synth_zip.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_SECRET_token")

    fetched = cli("data", "fetch", "--repo", "class/celeba", "--filename", "data/faces.zip")
    assert fetched.returncode == 0, fetched.stderr
    cached = Path(fetched.stdout.strip().splitlines()[-1])
    assert cached.read_bytes() == synth_zip.read_bytes() and str(cached).startswith(hub_env["HF_HOME"])
    downloads = fake_hub.count("resolve", "GET")
    again = cli("data", "fetch", "--repo", "class/celeba", "--filename", "data/faces.zip")
    assert again.returncode == 0 and fake_hub.count("resolve", "GET") == downloads, "second call uses the cache"

    shutil.rmtree(hub_env["HF_HOME"])  # the worker must fetch on first use
    out = tmp_path / "out"
    worker = _spawn("worker", "--db", migrated_url, "--data", "hf://class/celeba/data/faces.zip",
                    "--name", "hub-worker", "--threads", "1", log=tmp_path / "w.log")
    try:
        r = cli("coordinator", "--local-steps", "2", "--db", migrated_url, "--data", str(synth_zip), "--max-steps", "2",
                "--unit-size", "8", "--eval-every", "1", "--eval-n", "32", "--checkpoint-every", "1",
                "--hf-repo", "teacher/class-dcgan", "--hf-push-every", "2", "--out", str(out), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        assert _stop(worker) == 0
    data_gets = [r for r in fake_hub.of("resolve") if r["method"] == "GET" and r["path"].endswith("/data/faces.zip")]
    assert len(data_gets) == downloads + 1, "the worker downloaded the data once"
    events = asyncio.run(_fetch(migrated_url, "SELECT message FROM events WHERE kind = 'hub'"))
    assert any("pushed step 2" in e["message"] for e in events), events
    assert len(fake_hub.commits) >= 1
    files: dict[str, bytes] = {}
    for commit in fake_hub.commits:
        files.update(_committed(commit))
    assert {"config.json", "model.safetensors", "README.md", "checkpoint_latest.pth", "metrics.png",
            "samples/latest.png"} <= set(files)
    card = files["README.md"].decode()
    assert 'Generator.from_pretrained("teacher/class-dcgan")' in card
    for name in ("config.json", "model.safetensors", "README.md"):  # the folder is the repo, after the final push
        assert files[name] == (out / "generator" / name).read_bytes(), name
    # A user loads the class's model from the Hub (here the fake one) as the card says.
    load = subprocess.run(
        [sys.executable, "-c",
         "import torch; from ganns_async.model import Generator; "
         "g = Generator.from_pretrained('teacher/class-dcgan'); "
         "c = torch.load(r'%s', map_location='cpu'); "
         "print(all(torch.equal(v, c['generator_state_dict'][k]) for k, v in g.state_dict().items()))"
         % (out / "checkpoint_latest.pth")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **hub_env, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "user_hf")})
    assert load.returncode == 0 and load.stdout.strip().endswith("True"), load.stdout + load.stderr
    assert all(b"hf_test_SECRET_token" not in content for content in files.values())
    assert "hf_test_SECRET_token" not in r.stdout + r.stderr
    assert "hf_test_SECRET_token" not in (tmp_path / "w.log").read_text()


def test_failing_hub_never_stops_training(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                         hub_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_SECRET_token")
    worker = _spawn("worker", "--db", migrated_url, "--data", str(synth_zip), "--name", "steady",
                    "--threads", "1", log=tmp_path / "w.log")
    try:
        r = cli("coordinator", "--local-steps", "2", "--db", migrated_url, "--data", str(synth_zip), "--max-steps", "3",
                "--unit-size", "8", "--feature-maps", str(WIDTH), "--eval-every", "0", "--checkpoint-every", "1", "--hf-repo", "teacher/x",
                "--hf-push-every", "1", "--out", str(tmp_path / "out"), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        _stop(worker)
    done = asyncio.run(_fetch(migrated_url, "SELECT status, step FROM runs"))
    assert [tuple(x) for x in done] == [("done", 3)]
    events = asyncio.run(_fetch(migrated_url, "SELECT message FROM events WHERE kind = 'hub'"))
    assert events and all("failed" in e["message"] for e in events)
    assert "hf_test_SECRET_token" not in r.stdout + r.stderr
    os.environ.pop("HF_TOKEN", None)


def test_push_without_any_token_is_refused_at_start(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                                    hub_env: dict[str, str]) -> None:
    r = cli("coordinator", "--local-steps", "2", "--db", migrated_url, "--data", str(synth_zip), "--max-steps", "1",
            "--hf-repo", "teacher/x", "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and "HF_TOKEN" in r.stderr and "Traceback" not in r.stderr
