"""The Hugging Face Hub: fetch the CelebA zip, push the model as training goes.

Downloads go through ``hf_hub_download`` (its cache, its progress bars, its resume of an
interrupted stream); a file already in the cache is returned without touching the network.
Pushes are one commit per call through ``HfApi.create_commit``: the ``OUT/generator/``
folder (``config.json``, ``model.safetensors``, ``README.md``: what
``Generator.from_pretrained`` reads), the newest sample grid, the curves, and when asked the
full training checkpoint (both networks and optimizer states: several times the generator, so not every time: the repository's history keeps every
version of every file). Everything here is synchronous: callers on an event loop run it
in a thread.

The Hub endpoint is ``endpoint=`` when given, else ``HF_ENDPOINT`` read *at call time*
(huggingface_hub itself reads it once, at import), else huggingface_hub's default.
The token comes from ``token=``, else ``HF_TOKEN``, else the saved login; it is never
logged, never written to a file and never part of an error message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ganns_async.errors import UserError
from ganns_async.retry import Backoff

log = logging.getLogger(__name__)

DEFAULT_REPO = "gperdrizet/GANNs-with-friends"
DEFAULT_FILENAME = "data/img_align_celeba.zip"
HF_SCHEME = "hf://"

CHECKPOINT_NAME = "checkpoint_latest.pth"  # same name as ganns_async.outputs (not imported: it pulls in torch)
LATEST_SAMPLE = "samples/latest.png"
METRICS_NAME = "metrics.png"

GENERATOR_DIR = "generator"  # OUT/generator/: the exact content of the Hub repo's model files
MODEL_FILES = ("config.json", "model.safetensors")
CARD_NAME = "README.md"

# huggingface_hub's shared HTTP client has no timeout at all (``timeout=None``); its
# downloads pass their own (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT, 10 s) but
# create_repo, validate-yaml and the commit POST do not, so a hung Hub would hang a push
# forever. We give the shared client these defaults (read when a client is created).
HTTP_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0

_DATA_HINT = ("pass --data with a local img_align_celeba.zip instead "
              "(or make one with `ganns-async data synth`)")
_SAMPLE_RE = re.compile(r"^step_(\d+)\.png$")


class PushError(Exception):
    """A push to the Hub failed; the message is one line and never contains the token.

    ``transient`` is False for failures a retry will not fix by itself (no token, token
    rejected, repository not writable); the caller decides whether and when to retry.
    """

    def __init__(self, message: str, *, transient: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


# --------------------------------------------------------------------------- plumbing

_timeouts_lock = threading.Lock()
_timeouts_installed = False


def _ensure_http_timeouts() -> None:
    """Give huggingface_hub's shared client default timeouts (once per process).

    Left alone when someone already installed their own client factory.
    """
    global _timeouts_installed
    if _timeouts_installed:
        return
    with _timeouts_lock:
        if _timeouts_installed:
            return
        _timeouts_installed = True
        try:
            import httpx2
            from huggingface_hub import set_client_factory
            from huggingface_hub.utils import _http
        except ImportError:  # another huggingface_hub generation: keep its defaults
            return
        base = getattr(_http, "default_client_factory", None)
        if base is None or getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not base:
            return

        def factory() -> Any:
            client = base()
            client.timeout = httpx2.Timeout(HTTP_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
            return client

        set_client_factory(factory)


def hub_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT`` now, else huggingface_hub's (import-time) default."""
    if endpoint:
        return endpoint.rstrip("/")
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _first_line(text: object, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if any(cur is s for s in seen):
            continue
        seen.append(cur)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return seen


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _http_status(chain: Sequence[BaseException]) -> int | None:
    for exc in chain:
        status = _status_of(exc)
        if status is not None:
            return status
    return None


def _network_reason(chain: Sequence[BaseException], endpoint: str) -> str | None:
    """A short reason when the failure is connectivity (offline, refused, timeout), else None."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        import httpx2

        timeout_types: tuple[type[BaseException], ...] = (httpx2.TimeoutException, TimeoutError)
        connect_types: tuple[type[BaseException], ...] = (httpx2.ConnectError, httpx2.NetworkError,
                                                          httpx2.RemoteProtocolError, ConnectionError)
    except ImportError:  # pragma: no cover - other huggingface_hub generations
        timeout_types, connect_types = (TimeoutError,), (ConnectionError,)

    for exc in chain:
        if isinstance(exc, OfflineModeIsEnabled):
            return "offline mode is on (HF_HUB_OFFLINE=1) and the file is not in the local cache"
    for exc in chain:
        if isinstance(exc, timeout_types):
            return f"timed out talking to {endpoint}"
    for exc in chain:
        if isinstance(exc, connect_types):
            detail = _first_line(exc)
            return f"cannot connect ({detail})" if detail else "cannot connect"
    return None


# --------------------------------------------------------------------------- download


def _check_repo_id(repo: str, what: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except Exception as exc:  # HFValidationError
        raise UserError(f"invalid Hugging Face repository id {repo!r} for {what}: {_first_line(exc)} "
                        f"(expected OWNER/NAME, e.g. {DEFAULT_REPO})") from None
    if repo.count("/") != 1:
        raise UserError(f"invalid Hugging Face repository id {repo!r} for {what} "
                        f"(expected OWNER/NAME, e.g. {DEFAULT_REPO})")


def _check_path_in_repo(filename: str) -> None:
    parts = filename.split("/")
    if not filename or filename.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in filename:
        raise UserError(f"invalid file path in repository: {filename!r} (expected e.g. {DEFAULT_FILENAME})")


def _download_error(exc: BaseException, repo: str, filename: str, endpoint: str) -> UserError:
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = _chain(exc)
    status = _http_status(chain)
    auth_hint = "set HF_TOKEN or run `hf auth login` with a token that can read it"
    reason: str | None = None
    if any(isinstance(e, GatedRepoError) for e in chain):
        reason = f"access to this gated repository is denied: accept its terms on the Hub, then {auth_hint}"
    elif any(isinstance(e, RemoteEntryNotFoundError) for e in chain):
        reason = "file not found in the repository"
    elif any(isinstance(e, RevisionNotFoundError) for e in chain):
        reason = "revision not found in the repository"
    elif any(isinstance(e, RepositoryNotFoundError) for e in chain):
        reason = f"repository not found (if it is private, {auth_hint})"
    elif status in (401, 403):
        reason = f"access denied (HTTP {status}): {auth_hint}"
    elif status == 404:
        reason = "not found (HTTP 404)"
    elif (net := _network_reason(chain, endpoint)) is not None:
        reason = net
    elif status is not None:
        reason = f"the Hub answered HTTP {status}"
    elif any(isinstance(e, FileMetadataError) for e in chain):
        reason = (f"{endpoint} does not answer like a Hugging Face Hub (no X-Repo-Commit/ETag headers; "
                  "check HF_ENDPOINT and any proxy)")
    elif isinstance(exc, PermissionError):
        reason = f"cannot write the download ({_first_line(exc)}); set HF_HOME or HF_HUB_CACHE to a writable folder"
    else:
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
    return UserError(f"cannot download {repo}/{filename} from {endpoint}: {reason}; {_DATA_HINT}")


def fetch_dataset(repo: str = DEFAULT_REPO, filename: str = DEFAULT_FILENAME, *, dest: Path | None = None,
                  repo_type: str = "model", revision: str | None = None, endpoint: str | None = None,
                  token: str | None = None, cache_dir: Path | str | None = None) -> Path:
    """Local path of ``filename`` from Hub repository ``repo``, downloading it when missing.

    Without ``dest`` the file lands in the Hub cache (``HF_HUB_CACHE``, or ``cache_dir``); with
    ``dest`` it lands at ``dest/filename``. A copy already there is returned with no network
    traffic at all. Failures raise :class:`UserError` telling the user to pass ``--data``.
    """
    _check_repo_id(repo, "the dataset")
    _check_path_in_repo(filename)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    url = hub_endpoint(endpoint)

    # 1. Already here? (no HEAD request for the etag, works offline)
    if dest is not None:
        local = Path(dest).expanduser() / filename
        if local.is_file():  # hf_hub_download moves a file into place only once complete
            log.info("using %s (already downloaded)", local)
            return local
    else:
        try:
            cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision,
                                            repo_type=repo_type)
        except Exception:  # unreadable cache: let the download path report it
            cached = None
        if isinstance(cached, str) and os.path.isfile(cached):
            log.info("using %s/%s from the Hugging Face cache: %s", repo, filename, cached)
            return Path(cached)

    # 2. Download (huggingface_hub's progress bar; an interrupted stream resumes with Range).
    _ensure_http_timeouts()
    log.info("downloading %s/%s from %s ...", repo, filename, url)
    try:
        path = hf_hub_download(repo, filename, repo_type=repo_type, revision=revision,
                               local_dir=str(dest) if dest is not None else None,
                               cache_dir=cache_dir, endpoint=url, token=token)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        raise _download_error(exc, repo, filename, url) from None
    log.info("downloaded %s/%s to %s", repo, filename, path)
    return Path(path)


def parse_hf_data(data: str) -> tuple[str, str, str, str | None]:
    """``hf://[models/|datasets/]OWNER/REPO[@REV][/PATH]`` -> (repo_type, repo, path, revision).

    A missing path means :data:`DEFAULT_FILENAME`.
    """
    example = f"{HF_SCHEME}{DEFAULT_REPO}/{DEFAULT_FILENAME}"
    from huggingface_hub.utils import parse_hf_uri

    try:
        uri = parse_hf_uri(data)
    except Exception as exc:
        raise UserError(f"malformed Hub location {data!r}: {_first_line(exc)} "
                        f"(expected hf://OWNER/REPO[/PATH/IN/REPO], e.g. {example})") from None
    if uri.type not in ("model", "dataset"):
        raise UserError(f"malformed Hub location {data!r}: only model and dataset repositories hold datasets "
                        f"here (expected hf://OWNER/REPO[/PATH/IN/REPO], e.g. {example})")
    path = (uri.path_in_repo or "").strip("/") or DEFAULT_FILENAME
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise UserError(f"malformed Hub location {data!r}: bad path {path!r} in the repository "
                        f"(expected hf://OWNER/REPO[/PATH/IN/REPO], e.g. {example})")
    return uri.type, uri.id, path, uri.revision


def resolve_data(data: str) -> str:
    """``--data`` as a local path: ``hf://...`` locations are fetched (cached), anything else is returned as is."""
    if not data.startswith(HF_SCHEME):
        return data
    repo_type, repo, path, revision = parse_hf_data(data)
    return str(fetch_dataset(repo, path, repo_type=repo_type, revision=revision))


# --------------------------------------------------------------------------- push


def newest_sample(out_dir: Path) -> Path | None:
    """``out_dir/samples/step_NNNNNN.png`` with the highest step, or None."""
    best: tuple[int, Path] | None = None
    samples = Path(out_dir) / "samples"
    if not samples.is_dir():
        return None
    for p in samples.iterdir():
        m = _SAMPLE_RE.match(p.name)
        if m and p.is_file():
            key = (int(m.group(1)), p)
            if best is None or key[0] > best[0]:
                best = key
    return best[1] if best else None


PUSH_BACKOFF = Backoff(base=30.0, cap=600.0, jitter=False)  # one process pushes: no herd to spread


def push_backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failed pushes: 30, 60, 120, ... capped at 600
    (the project's one backoff, :class:`ganns_async.retry.Backoff`)."""
    if failures <= 0:
        return 0.0
    return PUSH_BACKOFF.ceiling(failures - 1)


class HubPusher:
    """Pushes a run's outputs to one Hub model repository, one commit per :meth:`push`.

    The repository is created (``exist_ok``) before the first successful push. Thread-safe
    enough for one caller thread at a time; the token is never logged or written anywhere.
    """

    def __init__(self, repo_id: str, *, private: bool = False, token: str | None = None,
                 endpoint: str | None = None) -> None:
        _check_repo_id(repo_id, "pushing")
        self.repo_id = repo_id
        self.private = private
        self.endpoint = hub_endpoint(endpoint)
        self.__token = token or None
        self._created = False

    def __repr__(self) -> str:  # never the token
        return f"HubPusher(repo_id={self.repo_id!r}, private={self.private}, endpoint={self.endpoint!r})"

    def check_token(self) -> None:
        """Raise PushError now if there is no usable token, rather than at the first push."""
        self._resolve_token()

    def _resolve_token(self) -> str:
        if self.__token:
            return self.__token
        from huggingface_hub import get_token

        try:
            token = get_token()  # HF_TOKEN, then the saved `hf auth login`
        except Exception as exc:
            raise PushError(f"push to {self.repo_id} failed: cannot read the Hugging Face token "
                            f"({type(exc).__name__}); set HF_TOKEN or run `hf auth login`",
                            transient=False) from None
        if not token:
            raise PushError(f"push to {self.repo_id} failed: no Hugging Face token; set HF_TOKEN or run "
                            "`hf auth login` with a token that can write", transient=False)
        return token

    def _error(self, exc: BaseException, token: str) -> PushError:
        from huggingface_hub.errors import RepositoryNotFoundError

        chain = _chain(exc)
        status = _http_status(chain)
        transient = True
        if status == 401:
            reason = "HTTP 401: the token was rejected; set HF_TOKEN or run `hf auth login` with a write token"
            transient = False
        elif status == 403:
            reason = (f"HTTP 403: the token may not write to {self.repo_id}; use a write token for its owner "
                      "(HF_TOKEN or `hf auth login`)")
            transient = False
        elif any(isinstance(e, RepositoryNotFoundError) for e in chain):
            reason = f"repository {self.repo_id} not found (and could not be created with this token)"
            transient = False
        elif (net := _network_reason(chain, self.endpoint)) is not None:
            reason = net
        elif status is not None and status >= 500:
            reason = f"the Hub answered HTTP {status} (server error)"
        elif status is not None:
            reason = f"the Hub answered HTTP {status}: {_first_line(exc)}"
            transient = status in (408, 409, 429)
        elif any(isinstance(e, json.JSONDecodeError) for e in chain):
            reason = "the Hub sent an answer that is not JSON (a proxy or server error page?)"
        elif isinstance(exc, OSError):
            reason = f"cannot read the files to push: {_first_line(exc)}"
        else:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
        message = f"push to {self.repo_id} at {self.endpoint} failed: {reason}"
        if token:
            message = message.replace(token, "***")
        return PushError(message, transient=transient, status=status)

    def _remote_card(self, api: Any) -> str | None:
        """The README.md on the Hub now (someone may have edited it there), or None."""
        import tempfile

        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        with tempfile.TemporaryDirectory(prefix="ganns-card-") as tmp:
            try:
                path = api.hf_hub_download(self.repo_id, CARD_NAME, repo_type="model", cache_dir=tmp)
            except (RepositoryNotFoundError, EntryNotFoundError):
                return None
            return Path(path).read_text(encoding="utf-8", errors="replace")

    def push(self, out_dir: Path, info: Mapping[str, Any], *, checkpoint: bool = True) -> str:
        """Upload ``out_dir/generator/``, the newest sample grid, the curves and (with
        ``checkpoint``) ``checkpoint_latest.pth`` in one commit; return the commit URL.

        The card pushed is the folder's card merged into the one on the Hub (its prose stays,
        metadata and figures are updated), and is written back to the folder, so the folder
        stays the repository's exact content. Raises :class:`PushError` (one line) on any
        failure; nothing is retried here.
        """
        from ganns_async.model_card import CARD_LOCK, merge_card

        out_dir = Path(out_dir)
        folder = out_dir / GENERATOR_DIR
        missing = [name for name in (*MODEL_FILES, CARD_NAME) if not (folder / name).is_file()]
        if missing:
            raise PushError(f"push to {self.repo_id} failed: {folder / missing[0]} does not exist yet", transient=True)
        ckpt = out_dir / CHECKPOINT_NAME
        if checkpoint and not ckpt.is_file():
            raise PushError(f"push to {self.repo_id} failed: {ckpt} does not exist yet", transient=True)
        token = self._resolve_token()
        _ensure_http_timeouts()
        from huggingface_hub import CommitOperationAdd, HfApi

        try:
            # Bytes, not paths: the coordinator may replace these files while we upload.
            files: list[tuple[str, bytes]] = [(name, (folder / name).read_bytes()) for name in MODEL_FILES]
            local_card = (folder / CARD_NAME).read_text(encoding="utf-8")
            if checkpoint:
                files.append((CHECKPOINT_NAME, ckpt.read_bytes()))
            sample = newest_sample(out_dir)
            if sample is not None:
                data = sample.read_bytes()
                files += [(LATEST_SAMPLE, data), (f"samples/{sample.name}", data)]
            metrics = out_dir / METRICS_NAME
            if metrics.is_file():
                files.append((METRICS_NAME, metrics.read_bytes()))
        except OSError as exc:
            raise PushError(f"push to {self.repo_id} failed: cannot read {_first_line(exc)}") from None

        step = info.get("step")
        what = "generator, samples, card" + (", training checkpoint" if checkpoint else "")
        api = HfApi(endpoint=self.endpoint, token=token)
        try:
            if not self._created:
                api.create_repo(self.repo_id, repo_type="model", exist_ok=True, private=self.private)
                self._created = True
            card = merge_card(self._remote_card(api), local_card)
            files.append((CARD_NAME, card.encode("utf-8")))
            operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files]
            commit = api.create_commit(self.repo_id, operations=operations, repo_type="model",
                                       commit_message=f"Training step {step}: {what}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raise self._error(exc, token) from None
        if card != local_card:
            with CARD_LOCK:  # the Hub's prose comes home; the next checkpoint's card merges into it
                try:
                    _replace_text(folder / CARD_NAME, merge_card(card, (folder / CARD_NAME).read_text(encoding="utf-8")))
                except OSError as exc:
                    log.warning("pushed, but could not update %s: %s", folder / CARD_NAME, exc)
        url = str(getattr(commit, "commit_url", None) or getattr(commit, "oid", "") or commit)
        log.info("pushed step %s to %s (%s)", step, self.repo_id, url)
        return url


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
