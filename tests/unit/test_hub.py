"""Hub download and push against a fake Hugging Face Hub on 127.0.0.1 (never the real one).

The fake (tests/fakehub.py) serves the routes huggingface_hub uses. A guard makes any name
lookup other than 127.0.0.1 fail, so nothing can leave the machine.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakehub import FakeHub, _closed_port, _committed
from ganns_async import hub
from ganns_async.data import write_synthetic
from ganns_async.errors import UserError

TOKEN = "hf_test_SECRET"


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private HF_HOME, no saved token, no telemetry, and no way to reach anything but 127.0.0.1."""
    from huggingface_hub import close_session, constants

    real_getaddrinfo = socket.getaddrinfo

    def only_loopback(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", b"127.0.0.1"):
            raise OSError(f"test guard: refusing to resolve {host!r} (only 127.0.0.1 is allowed)")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", only_loopback)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these at import time: patch the constants themselves.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Telemetry would fetch {constants.ENDPOINT}/api/agent-harnesses (the default endpoint).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    close_session()
    yield
    close_session()



@pytest.fixture
def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub backs off 1+2+4+8+8 s between retries: skip the waiting (not the retries)."""
    import huggingface_hub.utils._http as hf_http

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(hf_http, "time", fake_time)


@pytest.fixture
def faces_zip(tmp_path: Path) -> bytes:
    return write_synthetic(tmp_path / "src" / "faces.zip", 20).read_bytes()


# --------------------------------------------------------------------------- download


def test_fetch_downloads_then_uses_cache(fake_hub: FakeHub, faces_zip: bytes, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.files[("owner/repo", "data/faces.zip")] = faces_zip
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)  # read at call time by hub.fetch_dataset

    path = hub.fetch_dataset("owner/repo", "data/faces.zip")
    assert path.read_bytes() == faces_zip
    assert str(path).startswith(str(tmp_path / "hf_home" / "hub"))
    assert fake_hub.count("resolve", "GET") == 1

    before = len(fake_hub.requests)
    again = hub.fetch_dataset("owner/repo", "data/faces.zip")
    assert again == path
    assert len(fake_hub.requests) == before, "a cached file must not cost a request"

    resolved = hub.resolve_data("hf://owner/repo/data/faces.zip")
    assert resolved == str(path)
    assert len(fake_hub.requests) == before
    # a cached file is served even when the Hub is gone
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub.fetch_dataset("owner/repo", "data/faces.zip") == path


def test_fetch_default_filename_and_local_dir(fake_hub: FakeHub, faces_zip: bytes, tmp_path: Path) -> None:
    fake_hub.files[(hub.DEFAULT_REPO, hub.DEFAULT_FILENAME)] = faces_zip
    dest = tmp_path / "dest"
    path = hub.fetch_dataset(dest=dest, endpoint=fake_hub.url)
    assert path == dest / hub.DEFAULT_FILENAME
    assert path.read_bytes() == faces_zip
    gets = fake_hub.count("resolve", "GET")
    assert hub.fetch_dataset(dest=dest, endpoint=fake_hub.url) == path
    assert fake_hub.count("resolve", "GET") == gets
    # hf://OWNER/REPO means the default file
    assert hub.parse_hf_data(f"hf://{hub.DEFAULT_REPO}") == ("model", hub.DEFAULT_REPO, hub.DEFAULT_FILENAME, None)


def test_fetch_resumes_an_interrupted_stream(fake_hub: FakeHub, faces_zip: bytes,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream cut mid-body resumes with a Range request, within the same call.

    huggingface_hub 2.4.0 counts only whole DOWNLOAD_CHUNK_SIZE (10 MB) chunks as received, so
    the chunk is made small here; a partial file left by an earlier *process* is not resumed
    (2.4.0 downloads to a process-unique ``*.incomplete`` file and deletes it on failure).
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    fake_hub.files[("owner/repo", "faces.zip")] = faces_zip
    fake_hub.truncate_next_get = True
    path = hub.fetch_dataset("owner/repo", "faces.zip", endpoint=fake_hub.url)
    assert path.read_bytes() == faces_zip
    gets = [r for r in fake_hub.of("resolve") if r["method"] == "GET"]
    assert len(gets) == 2
    assert "range" not in gets[0]["headers"]
    resumed_at = int(gets[1]["headers"]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(faces_zip) // 2


def test_fetch_unreachable_endpoint_is_a_user_error(no_retry_sleep: None) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        hub.fetch_dataset("owner/repo", "data/faces.zip", endpoint=endpoint)
    msg = str(err.value)
    assert "pass --data" in msg and "ganns-async data synth" in msg
    assert "owner/repo/data/faces.zip" in msg and endpoint in msg
    assert "cannot connect" in msg
    assert "\n" not in msg
    assert time.monotonic() - t0 < 10


def test_fetch_offline_mode_without_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as err:
        hub.fetch_dataset("owner/repo", "data/faces.zip", endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert "pass --data" in str(err.value)


def test_fetch_not_found(fake_hub: FakeHub, faces_zip: bytes) -> None:
    fake_hub.files[("owner/repo", "data/faces.zip")] = faces_zip
    with pytest.raises(UserError, match="not found") as err:
        hub.fetch_dataset("owner/repo", "data/missing.zip", endpoint=fake_hub.url)
    assert "pass --data" in str(err.value)
    with pytest.raises(UserError, match="repository not found"):
        hub.fetch_dataset("owner/nope", "data/faces.zip", endpoint=fake_hub.url)


@pytest.mark.parametrize("status", [401, 403])
def test_fetch_auth_errors_mention_the_token(fake_hub: FakeHub, faces_zip: bytes, status: int) -> None:
    fake_hub.files[("owner/repo", "data/faces.zip")] = faces_zip
    fake_hub.status_for["resolve"] = status
    with pytest.raises(UserError) as err:
        hub.fetch_dataset("owner/repo", "data/faces.zip", endpoint=fake_hub.url)
    msg = str(err.value)
    assert "HF_TOKEN" in msg and "hf auth login" in msg and str(status) in msg


def test_resolve_data_passthrough_and_malformed() -> None:
    assert hub.resolve_data("celeba.zip") == "celeba.zip"
    assert hub.resolve_data("/data/img_align_celeba") == "/data/img_align_celeba"
    for bad in ("hf://", "hf://owner", "hf://owner//x.zip", "hf://owner/repo/../x.zip", "hf://buckets/a/b/c"):
        with pytest.raises(UserError, match="malformed Hub location"):
            hub.resolve_data(bad)
    assert hub.parse_hf_data("hf://datasets/a/b@v1/x/y.zip") == ("dataset", "a/b", "x/y.zip", "v1")


# --------------------------------------------------------------------------- push

INFO = {
    "step": 10,
    "epoch": 3,
    "images_seen": 12345,
    "workers": 7,
    "swd": 123.4,
    "config": {"unit_size": 64, "units_per_step": 2, "max_staleness": 1, "lr": 2e-4, "beta1": 0.5,
               "beta2": 0.999, "seed": 0},
}


def _generator_dir(out: Path, info: dict[str, Any] = INFO, repo_id: str = "owner/model") -> Path:
    """What the coordinator writes at a checkpoint: config.json, model.safetensors, README.md."""
    from ganns_async.model_card import render_card

    folder = out / "generator"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"feature_maps": 64, "latent_dim": 100, "num_channels": 3}')
    (folder / "model.safetensors").write_bytes(b"safetensors bytes " * 100)
    (folder / "README.md").write_text(render_card({**info, "repo_id": repo_id, "sample_name": "step_000010.png",
                                                   "has_metrics": True}))
    return folder


def _run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    _generator_dir(out)
    (out / "checkpoint_latest.pth").write_bytes(bytes(range(256)) * 50 + b"\xff\xfe ckpt")
    (out / "samples" / "step_000005.png").write_bytes(b"\x89PNG old grid")
    (out / "samples" / "step_000010.png").write_bytes(b"\x89PNG newest grid")
    (out / "samples" / ".step_000011.png.tmp").write_bytes(b"half-written")
    (out / "metrics.png").write_bytes(b"\x89PNG curves")
    return out


def test_push_one_commit_with_card(fake_hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    out = _run_dir(tmp_path)
    pusher = hub.HubPusher("owner/model", token=TOKEN, endpoint=fake_hub.url)
    assert TOKEN not in repr(pusher)

    url = pusher.push(out, INFO)
    assert url.startswith(f"{fake_hub.url}/owner/model/commit/")

    assert len(fake_hub.commits) == 1
    files = _committed(fake_hub.commits[0])
    assert set(files) == {"config.json", "model.safetensors", "README.md", "checkpoint_latest.pth",
                          "samples/latest.png", "samples/step_000010.png", "metrics.png"}
    for name in ("config.json", "model.safetensors", "README.md"):
        assert files[name] == (out / "generator" / name).read_bytes(), name  # the folder is the repo
    assert files["checkpoint_latest.pth"] == (out / "checkpoint_latest.pth").read_bytes()
    assert files["samples/latest.png"] == files["samples/step_000010.png"] == b"\x89PNG newest grid"
    assert files["metrics.png"] == b"\x89PNG curves"

    readme = files["README.md"].decode()
    for text in ("| Round (optimizer step) | 10 |", "| Epoch | 3 |", "| Images seen | 12,345 |",
                 "| Contributing workers | 7 |", "| 123.4 |", 'Generator.from_pretrained("owner/model")',
                 "(samples/latest.png)", "samples/step_000010.png", "(metrics.png)", "3,576,704", "2,765,568",
                 "| Batch | 128 (2 units x 64 images) |"):
        assert text in readme, text
    assert fake_hub.of("commit")[0]["path"].endswith("/commit/main")

    create = fake_hub.of("create")
    assert len(create) == 1
    assert json.loads(create[0]["body"]) == {"name": "model", "organization": "owner", "visibility": "public",
                                             "type": "model"}
    for route in ("create", "preupload", "commit"):
        for r in fake_hub.of(route):
            assert r["headers"].get("authorization") == f"Bearer {TOKEN}", route

    # the token is in no uploaded byte, no log record, no console output
    for content in files.values():
        assert TOKEN.encode() not in content
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    assert fake_hub.count("unknown") == 0

    # a second push makes a second commit without creating the repo again, and without the
    # training checkpoint when not asked for
    (out / "samples" / "step_000020.png").write_bytes(b"\x89PNG step 20")
    _generator_dir(out, {**INFO, "step": 20, "swd": None})
    pusher.push(out, {**INFO, "step": 20, "swd": None}, checkpoint=False)
    assert len(fake_hub.of("create")) == 1
    files2 = _committed(fake_hub.commits[1])
    assert "checkpoint_latest.pth" not in files2
    assert files2["samples/latest.png"] == b"\x89PNG step 20"
    assert "samples/step_000020.png" in files2
    assert "not recorded" in files2["README.md"].decode()


def test_push_keeps_the_prose_of_a_card_edited_on_the_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = _run_dir(tmp_path)
    pusher = hub.HubPusher("owner/model", token=TOKEN, endpoint=fake_hub.url)
    pusher.push(out, INFO)
    # Someone edits the card on the Hub: new prose, a changed heading, their own tag and licence.
    edited = fake_hub.files[("owner/model", "README.md")].decode()
    edited = edited.replace("## Model description", "## About our class\n\nTrained by room 101 in one afternoon.")
    edited = edited.replace("license: mit", "license: apache-2.0\nlanguage: en").replace("tags:\n", "tags:\n- room-101\n")
    fake_hub.files[("owner/model", "README.md")] = edited.encode()

    later = {**INFO, "step": 20, "swd": 42.1, "images_seen": 99999}
    _generator_dir(out, later)  # the next checkpoint's card
    pusher.push(out, later, checkpoint=False)
    pushed = _committed(fake_hub.commits[-1])["README.md"].decode()
    assert "## About our class\n\nTrained by room 101 in one afternoon." in pushed
    assert "## Model description" not in pushed
    assert "| Round (optimizer step) | 20 |" in pushed and "| Images seen | 99,999 |" in pushed
    assert "| Round (optimizer step) | 10 |" not in pushed
    meta = ModelCard(pushed).data
    assert meta.license == "apache-2.0" and meta.language == "en"
    assert "room-101" in meta.tags and "dcgan" in meta.tags
    assert meta.eval_results[0].metric_value == pytest.approx(42.1)
    assert meta.library_name == "ganns-async" and meta.pipeline_tag == "unconditional-image-generation"
    # the folder is the repository's exact content again
    assert (out / "generator" / "README.md").read_text() == pushed


def test_push_private_and_minimal_run(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _generator_dir(out)
    (out / "checkpoint_latest.pth").write_bytes(b"ckpt")
    hub.HubPusher("owner/model", private=True, token=TOKEN, endpoint=fake_hub.url).push(out, INFO)
    assert json.loads(fake_hub.of("create")[0]["body"])["visibility"] == "private"
    files = _committed(fake_hub.commits[0])
    assert set(files) == {"config.json", "model.safetensors", "checkpoint_latest.pth", "README.md"}


def test_push_token_from_env(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    hub.HubPusher("owner/model", endpoint=fake_hub.url).push(_run_dir(tmp_path), INFO)
    assert fake_hub.of("commit")[0]["headers"]["authorization"] == "Bearer hf_from_env"


def test_push_without_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(hub.PushError, match="HF_TOKEN") as err:
        hub.HubPusher("owner/model", endpoint=fake_hub.url).push(_run_dir(tmp_path), INFO)
    assert err.value.transient is False
    assert fake_hub.requests == []


def test_push_server_error(fake_hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake_hub.status_for["commit"] = 500
    pusher = hub.HubPusher("owner/model", token=TOKEN, endpoint=fake_hub.url)
    with pytest.raises(hub.PushError) as err:
        pusher.push(_run_dir(tmp_path), INFO)
    msg = str(err.value)
    assert "500" in msg and "\n" not in msg and TOKEN not in msg
    assert err.value.transient and err.value.status == 500
    assert TOKEN not in caplog.text
    # the next try goes through (the repo is known to exist by then)
    del fake_hub.status_for["commit"]
    pusher.push(_run_dir(tmp_path / "again"), INFO)
    assert len(fake_hub.commits) == 1 and len(fake_hub.of("create")) == 1


def test_push_rejected_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.status_for["create"] = 401
    with pytest.raises(hub.PushError, match="401") as err:
        hub.HubPusher("owner/model", token=TOKEN, endpoint=fake_hub.url).push(_run_dir(tmp_path), INFO)
    assert "hf auth login" in str(err.value) and not err.value.transient


def test_push_unreachable_is_quick(tmp_path: Path) -> None:
    pusher = hub.HubPusher("owner/model", token=TOKEN, endpoint=f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(hub.PushError, match="cannot connect") as err:
        pusher.push(_run_dir(tmp_path), INFO)
    assert time.monotonic() - t0 < 5
    assert err.value.transient and TOKEN not in str(err.value)


def test_push_timeout(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import close_session

    monkeypatch.setattr(hub, "HTTP_TIMEOUT_S", 0.5)
    hub._ensure_http_timeouts()
    close_session()  # the next client picks up the short timeout
    fake_hub.delay_for["commit"] = 3.0
    t0 = time.monotonic()
    with pytest.raises(hub.PushError, match="timed out"):
        hub.HubPusher("owner/model", token=TOKEN, endpoint=fake_hub.url).push(_run_dir(tmp_path), INFO)
    assert time.monotonic() - t0 < 3


def test_push_nothing_to_push(tmp_path: Path) -> None:
    with pytest.raises(hub.PushError, match="generator/config.json does not exist yet"):
        hub.HubPusher("owner/model", token=TOKEN, endpoint="http://127.0.0.1:9").push(tmp_path, INFO)
    _generator_dir(tmp_path)
    with pytest.raises(hub.PushError, match="checkpoint_latest.pth does not exist yet"):
        hub.HubPusher("owner/model", token=TOKEN, endpoint="http://127.0.0.1:9").push(tmp_path, INFO)


def test_bad_repo_id_is_a_user_error() -> None:
    for bad in ("nodash", "a/b/c", "bad name/x"):
        with pytest.raises(UserError):
            hub.HubPusher(bad, token=TOKEN)


def test_push_backoff() -> None:
    assert hub.push_backoff(0) == 0
    assert [hub.push_backoff(n) for n in (1, 2, 3, 4, 5, 6, 7, 50)] == [30, 60, 120, 240, 480, 600, 600, 600]


def test_publisher_sends_the_training_checkpoint_rarely(fake_hub: FakeHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """First push, then every --hf-checkpoint-every steps, and the final push carry the checkpoint."""
    import asyncio

    from ganns_async.hub_publisher import HubPublisher

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = _run_dir(tmp_path)
    events: list[str] = []

    async def event(msg: str) -> None:
        events.append(msg)

    async def written() -> None:
        return None

    async def run() -> None:
        pub = HubPublisher("owner/model", private=False, out=out, checkpoint_every=3, event=event,
                           outputs_written=written)
        try:
            for step in range(1, 6):
                _generator_dir(out, {**INFO, "step": step})
                pub.maybe_push({**INFO, "step": step})
                await pub.wait()
            await pub.final_push({**INFO, "step": 5})
        finally:
            pub.close()

    asyncio.run(run())
    with_ckpt = ["checkpoint_latest.pth" in _committed(c) for c in fake_hub.commits]
    assert with_ckpt == [True, False, False, True, False, True], (with_ckpt, events)  # steps 1 2 3 4 5, final
    assert sum("with the training checkpoint" in e for e in events) == 3
