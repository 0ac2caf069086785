"""Hub download and push against a fake Hugging Face Hub on 127.0.0.1 (never the real one).

The fake serves the routes huggingface_hub 2.4.0 uses: HEAD/GET ``/{repo}/resolve/{rev}/{path}``
(with Range), ``/api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``
(every file "regular", so no LFS/Xet) and ``/api/models/{repo}/commit/{rev}`` (ndjson). A guard
makes any name lookup other than 127.0.0.1 fail, so nothing can leave the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from ganns_async import hub
from ganns_async.data import write_synthetic
from ganns_async.errors import UserError

TOKEN = "hf_test_SECRET"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """A threaded HTTP server speaking enough of the Hub API; records every request."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # (repo_id, path) -> content
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.commits: list[list[dict[str, Any]]] = []
        self.status_for: dict[str, int] = {}  # route name -> forced status
        self.delay_for: dict[str, float] = {}  # route name -> seconds to sleep before answering
        self.truncate_next_get = False  # send half of the next GET body, then drop the connection
        hubself = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                      head: bool = False) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body and self.command != "HEAD":  # HEAD answers carry no body
                    self.wfile.write(body)

            def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _record(self, route: str, body: bytes) -> None:
                with hubself.lock:
                    hubself.requests.append({"method": self.command, "path": self.path, "route": route,
                                             "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})

            def _forced(self, route: str) -> bool:
                if route in hubself.delay_for:
                    time.sleep(hubself.delay_for[route])
                status = hubself.status_for.get(route)
                if status is not None:
                    self._json(status, {"error": f"forced {status}"})
                    return True
                return False

            def _resolve(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                owner, name, _, _rev, *rest = path.lstrip("/").split("/")
                repo_id, filename = f"{owner}/{name}", "/".join(rest)
                route = "resolve"
                self._record(route, b"")
                if self._forced(route):
                    return
                if not any(r == repo_id for r, _ in hubself.files):
                    self._json(404, {"error": "Repository not found"},
                               {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                    return
                data = hubself.files.get((repo_id, filename))
                if data is None:
                    self._json(404, {"error": "Entry not found"},
                               {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                    return
                etag = hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if head:
                    self._send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
                    return
                rng = self.headers.get("Range")
                start = 0
                if rng:
                    start = int(rng.split("=", 1)[1].split("-", 1)[0])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                status = 206 if rng else 200
                body = data[start:]
                if hubself.truncate_next_get:
                    hubself.truncate_next_get = False
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, body, headers)

            def do_HEAD(self) -> None:  # noqa: N802
                if "/resolve/" in self.path:
                    self._resolve(head=True)
                else:
                    self._record("unknown", b"")
                    self._send(404, b"", head=True)

            def do_GET(self) -> None:  # noqa: N802
                if "/resolve/" in self.path:
                    self._resolve(head=False)
                else:
                    self._record("unknown", b"")
                    self._json(404, {"error": "no such route in the fake hub"})

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                path = urlsplit(self.path).path
                if path == "/api/repos/create":
                    self._record("create", body)
                    if self._forced("create"):
                        return
                    payload = json.loads(body)
                    self._json(200, {"url": f"{hubself.url}/{payload['organization']}/{payload['name']}"})
                elif path == "/api/validate-yaml":
                    self._record("validate-yaml", body)
                    if self._forced("validate-yaml"):
                        return
                    self._json(200, {"errors": [], "warnings": []})
                elif path.startswith("/api/models/") and "/preupload/" in path:
                    self._record("preupload", body)
                    if self._forced("preupload"):
                        return
                    files = json.loads(body)["files"]
                    self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                "oid": None} for f in files]})
                elif path.startswith("/api/models/") and "/commit/" in path:
                    self._record("commit", body)
                    if self._forced("commit"):
                        return
                    items = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    with hubself.lock:
                        hubself.commits.append(items)
                    repo_id = path[len("/api/models/"):].split("/commit/")[0]
                    oid = hashlib.sha1(body).hexdigest()
                    self._json(200, {"commitUrl": f"{hubself.url}/{repo_id}/commit/{oid}", "commitOid": oid})
                else:
                    self._record("unknown", body)
                    self._json(404, {"error": "no such route in the fake hub"})

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:  # client went away: fine
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def count(self, route: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["route"] == route and (method is None or r["method"] == method))

    def of(self, route: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["route"] == route]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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
def fake_hub() -> Iterator[FakeHub]:
    # Not patched: huggingface_hub.constants.ENDPOINT. hf_hub_url() swaps the prefix of the
    # import-time URL template for ``endpoint=`` only while the two still agree; stray calls to
    # the default endpoint hit the loopback guard instead.
    server = FakeHub()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


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
    "swd": 0.1234,
    "config": {"unit_size": 64, "units_per_step": 2, "max_staleness": 1, "lr": 2e-4, "beta1": 0.5,
               "beta2": 0.999, "seed": 0},
}


def _run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "checkpoint_latest.pth").write_bytes(bytes(range(256)) * 50 + b"\xff\xfe ckpt")
    (out / "samples" / "step_000005.png").write_bytes(b"\x89PNG old grid")
    (out / "samples" / "step_000010.png").write_bytes(b"\x89PNG newest grid")
    (out / "samples" / ".step_000011.png.tmp").write_bytes(b"half-written")
    (out / "metrics.png").write_bytes(b"\x89PNG curves")
    return out


def _committed(items: list[dict[str, Any]]) -> dict[str, bytes]:
    assert items[0]["key"] == "header"
    files = {}
    for item in items[1:]:
        assert item["key"] == "file", item["key"]
        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


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
    assert set(files) == {"checkpoint_latest.pth", "samples/latest.png", "samples/step_000010.png",
                          "metrics.png", "README.md"}
    assert files["checkpoint_latest.pth"] == (out / "checkpoint_latest.pth").read_bytes()
    assert files["samples/latest.png"] == files["samples/step_000010.png"] == b"\x89PNG newest grid"
    assert files["metrics.png"] == b"\x89PNG curves"

    readme = files["README.md"].decode()
    assert readme.startswith("---\nlicense: mit\n")
    for text in ("| Optimizer step | 10 |", "| Epoch | 3 |", "| Images seen | 12,345 |",
                 "| Contributing workers | 7 |", "0.1234", 'repo_id="owner/model"',
                 'filename="checkpoint_latest.pth"', "(samples/latest.png)", "samples/step_000010.png",
                 "(metrics.png)", "3,576,704", "2,765,568", "| Effective batch size | 128"):
        assert text in readme, text

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
    assert not list(out.rglob("*README*")), "the card is uploaded, not written into the run folder"
    assert fake_hub.count("unknown") == 0

    # a second push makes a second commit without creating the repo again
    (out / "samples" / "step_000020.png").write_bytes(b"\x89PNG step 20")
    pusher.push(out, {**INFO, "step": 20, "swd": None})
    assert len(fake_hub.of("create")) == 1
    files2 = _committed(fake_hub.commits[1])
    assert files2["samples/latest.png"] == b"\x89PNG step 20"
    assert "samples/step_000020.png" in files2
    assert "not recorded" in files2["README.md"].decode()


def test_push_private_and_minimal_run(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_latest.pth").write_bytes(b"ckpt")
    hub.HubPusher("owner/model", private=True, token=TOKEN, endpoint=fake_hub.url).push(out, INFO)
    assert json.loads(fake_hub.of("create")[0]["body"])["visibility"] == "private"
    files = _committed(fake_hub.commits[0])
    assert set(files) == {"checkpoint_latest.pth", "README.md"}
    assert "samples/latest.png" not in files["README.md"].decode()


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
    with pytest.raises(hub.PushError, match="does not exist"):
        hub.HubPusher("owner/model", token=TOKEN, endpoint="http://127.0.0.1:9").push(tmp_path, INFO)


def test_bad_repo_id_is_a_user_error() -> None:
    for bad in ("nodash", "a/b/c", "bad name/x"):
        with pytest.raises(UserError):
            hub.HubPusher(bad, token=TOKEN)


def test_push_backoff() -> None:
    assert hub.push_backoff(0) == 0
    assert [hub.push_backoff(n) for n in (1, 2, 3, 4, 5, 6, 7, 50)] == [30, 60, 120, 240, 480, 600, 600, 600]


def test_model_card_front_matter_parses() -> None:
    import yaml

    card = hub.build_model_card({**INFO, "repo_id": "a/b", "sample_name": None, "has_metrics": False})
    front = card.split("---\n")[1]
    meta = yaml.safe_load(front)
    assert meta["license"] == "mit"
    assert {"pytorch", "gan", "dcgan", "celeba", "distributed-training"} <= set(meta["tags"])
    assert meta["pipeline_tag"]
    assert "(metrics.png)" not in card and "samples/latest.png" not in card
