"""A fake Hugging Face Hub on 127.0.0.1 (never the real one), for tests/unit/test_hub.py and
tests/acceptance/test_hub_cluster.py.

The fake serves the routes huggingface_hub 2.4.0 uses: HEAD/GET ``/{repo}/resolve/{rev}/{path}``
(with Range), ``/api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``
(every file "regular", so no LFS/Xet) and ``/api/models/{repo}/commit/{rev}`` (ndjson); committed
files are served by ``resolve`` afterwards, as on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

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
                    repo_id = path[len("/api/models/"):].split("/commit/")[0]
                    with hubself.lock:
                        hubself.commits.append(items)
                        for name, content in _committed(items).items():  # served by resolve from now on
                            hubself.files[(repo_id, name)] = content
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


def _committed(items: list[dict[str, Any]]) -> dict[str, bytes]:
    assert items[0]["key"] == "header"
    files = {}
    for item in items[1:]:
        assert item["key"] == "file", item["key"]
        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files
