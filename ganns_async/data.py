"""CelebA-style image dataset: read a zip in place or a folder, and make synthetic ones.

Workers and the coordinator must agree on *which* images index ``i`` names without
shipping the data around, so entries are sorted by basename and summarised by a
``fingerprint`` of every image's name, size and CRC-32 that ignores the container (zip
or extracted folder). Preprocessing matches the PyTorch DCGAN tutorial so results are
comparable with it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import itertools
import json
import math
import operator
import os
import random
import shutil
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from ganns_async.errors import UserError

IMAGE_SIZE = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_SYNTH_HINT = "make one with `ganns-async data synth --out PATH.zip`"


def preprocess(rgb: Image.Image) -> torch.Tensor:
    """An RGB image as the model sees it: the DCGAN tutorial's (and the model card's)
    ``Resize(64)`` (bilinear, antialiased), ``CenterCrop(64)``, ``ToTensor()``,
    ``Normalize((0.5,) * 3, (0.5,) * 3)``, computed as torchvision computes them on a PIL
    image, bit for bit (tests/unit/test_data.py compares the two on many shapes).

    Written out instead of imported because importing torchvision costs a worker about
    2 s of start-up (it loads torch._dynamo and sympy; scripts/bench_startup.py), for four
    lines of arithmetic.
    """
    w, h = rgb.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = IMAGE_SIZE, int(IMAGE_SIZE * long / short)  # torchvision truncates
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.BILINEAR)  # what torchvision asks PIL for
    top, left = int(round((new_h - IMAGE_SIZE) / 2.0)), int(round((new_w - IMAGE_SIZE) / 2.0))
    rgb = rgb.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    pixels = torch.from_numpy(np.array(rgb, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return pixels.to(torch.float32).div(255).sub_(0.5).div_(0.5)


class _ClosedError(RuntimeError):
    """Raised by reads after :meth:`ImageDataset.close`; kept distinct from decode errors."""


def _is_image_name(relpath: str) -> bool:
    """True for image files we train on; skips macOS resource forks and dot-files."""
    parts = relpath.replace("\\", "/").split("/")
    if "__MACOSX" in parts or any(p.startswith(".") for p in parts if p):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


class ImageDataset:
    """Images in a CelebA zip (read in place) or a folder (searched recursively).

    ``names[i]`` is the basename of image ``i``; entries are sorted by basename so the
    zip and the same images extracted to a folder index identically.

    ``fingerprint`` hashes the number of images and each one's basename, byte size and
    CRC-32, in index order. A zip gives size and CRC-32 from its central directory
    without decompressing anything (and :mod:`zipfile` checks the CRC when it reads a
    member, so bytes that do not match the directory fail to load instead of training
    silently); a folder's files are read once and their CRC-32 is kept in a per-user
    cache (see :func:`_folder_checksums`), so opening it again costs a ``stat`` per file.
    A zip and the same images extracted to a folder therefore get the same fingerprint.

    What it protects against: a different, re-encoded, damaged or edited copy of the
    data, even one that keeps every name and size, cannot join a run — mistakes and
    naive tampering are caught. What it does not: CRC-32 is not a cryptographic hash,
    and anyone who means to can make different image bytes with the same size and
    CRC-32, so it does not authenticate the data against a deliberate attacker.
    """

    path: Path
    names: list[str]
    fingerprint: str

    def __init__(self, path: Path, entries: list[tuple[str, str | zipfile.ZipInfo, int, int]],
                 zf: zipfile.ZipFile | None) -> None:
        """Use :meth:`open`; ``entries`` are ``(basename, zip member or file path, size, crc32)``,
        sorted."""
        self.path = path
        self._keys = [key for _, key, _, _ in entries]
        self.names = [name for name, _, _, _ in entries]
        self._zip = zf
        self._lock = threading.Lock()
        self._closed = False
        self.fingerprint = _fingerprint([(name, size, crc) for name, _, size, crc in entries])

    @classmethod
    def open(cls, path: str | Path, *, progress: Callable[[int, int], None] | None = None) -> ImageDataset:
        """Open a ``.zip`` without extracting it, or a folder; raise UserError if unusable.

        A folder's files are read once to checksum them (later opens use the cache);
        ``progress(done, total)`` is then called about every 1000 files and at the end.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise UserError(
                f"dataset not found: {path} (pass --data with a CelebA img_align_celeba.zip "
                f"or folder, or {_SYNTH_HINT})"
            )
        entries: list[tuple[str, str | zipfile.ZipInfo, int, int]]
        if path.is_dir():
            files = cls._scan_folder(path)
            sums = _folder_checksums(path, files, progress) if files else {}
            entries = [(name, fpath, *sums[fpath]) for name, fpath, _ in files]
            zf = None
        elif path.is_file():
            try:
                zf = zipfile.ZipFile(path, "r")
            except zipfile.BadZipFile:
                raise UserError(
                    f"dataset is not a readable zip file: {path} (pass a CelebA "
                    f"img_align_celeba.zip or a folder of images, or {_SYNTH_HINT})"
                ) from None
            except OSError as exc:
                raise UserError(f"cannot read dataset {path}: {exc.strerror or exc} (check permissions)") from None
            entries = [
                (info.filename.rsplit("/", 1)[-1], info, info.file_size, info.CRC)
                for info in zf.infolist()
                if not info.is_dir() and _is_image_name(info.filename)
            ]
        else:
            raise UserError(f"dataset is neither a zip file nor a folder: {path} (pass --data with a .zip or folder)")
        if not entries:
            if zf is not None:
                zf.close()
            raise UserError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in dataset {path} "
                f"(pass a CelebA img_align_celeba.zip or folder, or {_SYNTH_HINT})"
            )
        # Sort by basename (unique in CelebA); the full key only breaks ties deterministically.
        entries.sort(key=lambda e: (e[0], e[1].filename if isinstance(e[1], zipfile.ZipInfo) else e[1]))
        dataset = cls(path, entries, zf)
        try:
            dataset._require_decodable()
        except BaseException:
            dataset.close()
            raise
        return dataset

    def _require_decodable(self, tries: int = 32) -> None:
        """Raise UserError unless one image of a sample spread over the dataset decodes.

        A bad image costs one sample (see :meth:`load`), so files that only look like images
        (Git LFS pointers of a repository cloned without LFS, renamed or encrypted files)
        would otherwise train on nothing and say nothing. The first image that decodes ends
        the check, so a good dataset costs one decode.
        """
        n = len(self.names)
        picks = sorted({k * n // min(n, tries) for k in range(min(n, tries))})
        first: tuple[str, bytes, BaseException] | None = None
        for i in picks:
            data = b""
            try:
                data = self._read(i)
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                return
            except Exception as exc:  # noqa: BLE001 - any failure to decode counts the same
                if first is None:
                    first = (self.names[i], data, exc)
        assert first is not None
        name, data, exc = first
        if data.startswith(b"version https://git-lfs"):
            why = "a Git LFS pointer, not the image; fetch the files with `git lfs pull`"
        elif isinstance(exc, UnidentifiedImageError):
            why = "not a JPEG or PNG image"
        else:
            why = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"dataset {self.path} holds no image that can be decoded "
                        f"(checked {len(picks)} of {n}; {name}: {why})")

    @staticmethod
    def _scan_folder(root: Path) -> list[tuple[str, str, os.stat_result]]:
        """Recursively list image files under ``root`` with their ``stat`` results."""
        entries: list[tuple[str, str, os.stat_result]] = []
        stack = [str(root)]
        while stack:
            current = stack.pop()
            try:
                with os.scandir(current) as it:
                    for entry in it:
                        if entry.name.startswith(".") or entry.name == "__MACOSX":
                            continue
                        if entry.is_dir():
                            stack.append(entry.path)
                        elif entry.is_file() and _is_image_name(entry.name):
                            entries.append((entry.name, entry.path, entry.stat()))
            except OSError as exc:
                raise UserError(f"cannot read dataset folder {current}: {exc.strerror or exc} (check permissions)") from None
        return entries

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ImageDataset({str(self.path)!r}, n={len(self)}, fingerprint={self.fingerprint})"

    def __enter__(self) -> ImageDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, index: int) -> bytes:
        """Raw bytes of one image; zip reads hold the lock because ZipFile shares one file handle."""
        key = self._keys[index]
        if self._zip is not None:
            with self._lock:
                if self._closed:
                    raise _ClosedError("dataset is closed")
                return self._zip.read(key)
        with open(key, "rb") as fh:  # type: ignore[arg-type]
            return fh.read()

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Decode and preprocess ``indices`` into a (n, 3, 64, 64) float32 tensor in [-1, 1].

        Returns ``(images, bad)``: images of the readable entries in the given order and the
        indices that could not be read or decoded. A bad image in a 200k-image dataset should
        cost one sample, not a training run, so this never raises for unreadable images;
        out-of-range indices are a caller bug and raise IndexError.
        """
        if self._closed:
            raise _ClosedError("dataset is closed")
        n = len(self.names)
        idx = [operator.index(i) for i in indices]
        for i in idx:
            if not 0 <= i < n:
                raise IndexError(f"image index {i} out of range for dataset of {n} images")
        tensors: list[torch.Tensor] = []
        bad: list[int] = []
        for i in idx:
            try:
                data = self._read(i)
                with Image.open(io.BytesIO(data)) as im:
                    im.load()  # force full decode so truncated files fail here
                    rgb = im.convert("RGB")
            except _ClosedError:
                raise
            except Exception:  # corrupt/truncated/empty image, CRC error, vanished file
                bad.append(i)
                continue
            tensors.append(preprocess(rgb))
        if not tensors:
            return torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32), bad
        return torch.stack(tensors), bad

    def close(self) -> None:
        """Release the zip file handle; safe to call more than once."""
        with self._lock:
            self._closed = True
            if self._zip is not None:
                self._zip.close()
                self._zip = None


def _fingerprint(images: Sequence[tuple[str, int, int]]) -> str:
    """16 hex digits of SHA-256 over the count and each ``(basename, size, crc32)``, in order."""
    lines = "".join([f"{name}\t{size}\t{crc:08x}\n" for name, size, crc in images])
    text = f"ganns-async images v2\n{len(images)}\n{lines}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Checksums of a folder's files, cached per user.

_CACHE_FORMAT = 1
_CACHE_KEEP = 64              # cache files kept (one per dataset folder); the oldest go first
_HASH_CHUNK = 1 << 20
_HASH_THREADS = 8             # reading many small files is latency-bound: overlap the reads
_HASH_BATCH = 256             # files per thread task (one future per file costs more than a read)
_PROGRESS_EVERY = 1000
# File times are coarse (a clock tick; 1-2 s on some file systems), so a file rewritten
# in the same tick as it was read keeps its size, mtime and ctime. As git does with its
# index, a file changed this recently before it was read is used but not cached.
_RACY_NS = 2_000_000_000


def _cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/ganns-async/folder-crc`` (``~/.cache`` when unset), or None."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    try:
        root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    except (RuntimeError, KeyError, OSError):  # no resolvable home directory
        return None
    return root / "ganns-async" / "folder-crc"


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    # ctime too: unlike mtime it cannot be set back by a tool that rewrites a file and
    # restores its timestamp, and any write to the file moves it.
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _crc_file(path: str) -> tuple[int, int, tuple[int, int, int] | None]:
    """``(size, crc32, stat key)`` of the bytes read; the key is None when the file
    changed while it was read or just before (see ``_RACY_NS``), so such a result is
    used but never cached."""
    started = time.time_ns()
    with open(path, "rb") as fh:
        before = _stat_key(os.fstat(fh.fileno()))
        crc = size = 0
        while chunk := fh.read(_HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        after = _stat_key(os.fstat(fh.fileno()))
    settled = after == before and after[0] == size and max(after[1], after[2]) < started - _RACY_NS
    return size, crc, (after if settled else None)


def _load_cache(file: Path, root: str) -> dict[str, object]:
    try:
        with open(file, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT or doc.get("root") != root:
        return {}
    files = doc.get("files")
    return files if isinstance(files, dict) else {}


def _save_cache(directory: Path, file: Path, root: str, files: dict[str, list[int]]) -> None:
    """Write atomically; a cache that cannot be written is silently skipped."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"format": _CACHE_FORMAT, "root": root, "files": files}, fh, separators=(",", ":"))
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        caches = sorted(directory.glob("*.json"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in caches[_CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _folder_checksums(root: Path, files: Sequence[tuple[str, str, os.stat_result]],
                      progress: Callable[[int, int], None] | None = None) -> dict[str, tuple[int, int]]:
    """``{path: (size, crc32)}`` of each file, reading only files the cache cannot vouch for.

    The cache (one JSON file per dataset folder, see :func:`_cache_dir`) maps each file's
    path under ``root`` to the size, mtime_ns and ctime_ns it had when it was read, and
    its CRC-32. An entry is used only when all three still match the file's ``stat``:
    a file that was replaced, rewritten or touched is read again, and a file changed
    within ``_RACY_NS`` before it was read is not cached at all. An unreadable or
    corrupt cache is ignored, an unwritable one skipped, both silently.
    """
    abs_root = os.path.abspath(root)
    prefix = str(root) + os.sep
    directory = _cache_dir()
    cache_file = None
    cached: dict[str, object] = {}
    if directory is not None:
        name = hashlib.blake2b(abs_root.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        cache_file = directory / f"{name}.json"
        cached = _load_cache(cache_file, abs_root)

    out: dict[str, tuple[int, int]] = {}
    fresh: dict[str, list[int]] = {}
    todo: list[tuple[str, str]] = []
    for _, path, st in files:
        rel = path.removeprefix(prefix)
        hit = cached.get(rel)
        key = _stat_key(st)
        if (type(hit) is list and len(hit) == 4 and tuple(hit[:3]) == key
                and type(hit[3]) is int and 0 <= hit[3] <= 0xFFFFFFFF):
            out[path] = (key[0], hit[3])
            fresh[rel] = hit
        else:
            todo.append((rel, path))

    def read(chunk: list[tuple[str, str]]) -> list[tuple[int, int, tuple[int, int, int] | None]]:
        results = []
        for _, path in chunk:
            try:
                results.append(_crc_file(path))
            except OSError as exc:
                raise UserError(f"cannot read dataset file {path}: {exc.strerror or exc} "
                                "(check its permissions, or remove it)") from None
        return results

    chunks = [todo[i:i + _HASH_BATCH] for i in range(0, len(todo), _HASH_BATCH)]
    threads = min(_HASH_THREADS, os.cpu_count() or 1, len(chunks))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="crc") if threads > 1 else None
    try:
        done = reported = 0
        for chunk, results in zip(chunks, pool.map(read, chunks) if pool is not None else map(read, chunks)):
            for (rel, path), (size, crc, stat_key) in zip(chunk, results):
                out[path] = (size, crc)
                if stat_key is not None:
                    fresh[rel] = [*stat_key, crc]
            done += len(chunk)
            if progress is not None and (done // _PROGRESS_EVERY > reported or done == len(todo)):
                reported = done // _PROGRESS_EVERY
                progress(done, len(todo))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    if directory is not None and cache_file is not None and fresh != cached:
        _save_cache(directory, cache_file, abs_root, fresh)
    return out


# ---------------------------------------------------------------------------------------
# Synthetic CelebA-like data, for demos and tests without the 1.4 GB download.

_W, _H = 178, 218
_GX = np.linspace(0.0, 1.0, _W, dtype=np.float32)[None, :]
_GY = np.linspace(0.0, 1.0, _H, dtype=np.float32)[:, None]
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamps keep the zip byte-identical per seed

_SKIN = [(255, 224, 196), (241, 194, 164), (224, 172, 138), (198, 144, 108), (160, 110, 80), (110, 74, 52)]
_HAIR = [
    (25, 20, 18), (40, 30, 25), (60, 42, 30),  # dark
    (95, 62, 38), (120, 80, 50), (140, 95, 60),  # brown
    (215, 185, 120), (230, 200, 140), (190, 160, 100),  # blond
    (150, 70, 40), (165, 165, 160),  # auburn, grey
]
_IRIS = [(90, 60, 35), (60, 40, 25), (70, 110, 150), (80, 120, 80), (110, 110, 115)]


def _jitter(rng: random.Random, color: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


def _scale(color: tuple[int, ...], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * f))) for c in color)  # type: ignore[return-value]


def _synth_image(seed: int, index: int) -> bytes:
    """One 178x218 JPEG of a face-like figure; per-image seeding makes prefixes stable."""
    rng = random.Random(seed * 1_000_003 + index)

    # Background: a portrait backdrop, a slightly tinted grey darkening in a random
    # direction. Muted like most CelebA backgrounds; fully random RGB gradients made the
    # set far more colourful than faces photos are, and a DCGAN needs thousands of steps
    # before its samples cover that many colours.
    grey = rng.uniform(80, 210)
    c0 = np.clip(np.array([grey + rng.uniform(-18, 18) for _ in range(3)], dtype=np.float32), 0, 255)
    c1 = c0 * rng.uniform(0.65, 1.0)
    a = rng.uniform(0.0, 2.0 * math.pi)
    t = _GX * math.cos(a) + _GY * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = (c0 + (c1 - c0) * t[..., None]).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)

    cx = 89 + rng.uniform(-5, 5)
    cy = 122 + rng.uniform(-5, 5)
    rx = rng.uniform(37, 46)
    ry = rng.uniform(49, 58)
    tilt = math.radians(rng.uniform(-10, 10))
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)

    def rot(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return (cx + dx * cos_t - dy * sin_t, cy + dx * sin_t + dy * cos_t)

    def ellipse(ex: float, ey: float, erx: float, ery: float, fill: tuple[int, int, int],
                t0: float = 0.0, t1: float = 2 * math.pi, n: int = 28) -> None:
        pts = [rot(ex + erx * math.cos(t0 + (t1 - t0) * k / n), ey + ery * math.sin(t0 + (t1 - t0) * k / n))
               for k in range(n + 1)]
        draw.polygon(pts, fill=fill)

    skin = _jitter(rng, rng.choice(_SKIN), 12)
    hair = _jitter(rng, rng.choice(_HAIR), 10)
    shade = _scale(skin, 0.82)

    # Clothes / shoulders, neck.
    draw.ellipse((cx - 95 + rng.uniform(-8, 8), _H - 35 + rng.uniform(-8, 8), cx + 95 + rng.uniform(-8, 8), _H + 80),
                 fill=_jitter(rng, (rng.randint(20, 220),) * 3, 60))
    draw.polygon([rot(cx - rx * 0.45, cy + ry * 0.6), rot(cx + rx * 0.45, cy + ry * 0.6),
                  (cx + rx * 0.55, _H - 20), (cx - rx * 0.55, _H - 20)], fill=shade)

    # Hair behind the head, optionally long.
    ellipse(cx, cy - ry * 0.22, rx * rng.uniform(1.15, 1.3), ry * rng.uniform(0.98, 1.1), hair)
    if rng.random() < 0.5:
        length = ry * rng.uniform(0.7, 1.3)
        draw.polygon([rot(cx - rx * 1.2, cy - ry * 0.3), rot(cx + rx * 1.2, cy - ry * 0.3),
                      rot(cx + rx * 1.3, cy + length), rot(cx - rx * 1.3, cy + length)], fill=hair)

    # Ears, face.
    for side in (-1, 1):
        ellipse(cx + side * rx * 0.97, cy + ry * 0.02, 6, 11, shade, n=12)
    ellipse(cx, cy, rx, ry, skin, n=36)

    # Fringe: cap over the top of the face down to a slightly wavy hairline.
    hairline = cy - ry * rng.uniform(0.45, 0.65)
    cap = [rot(cx + rx * 1.04 * math.cos(th), cy + ry * 1.04 * math.sin(th))
           for th in (math.pi + k * math.pi / 20 for k in range(21))]
    ys = [hairline + rng.uniform(-4, 4) for _ in range(5)]
    wave = [rot(cx + rx * (1.0 - 2.0 * k / 4), ys[k]) for k in range(5)]
    draw.polygon([rot(cx - rx * 1.04, hairline)] + cap + wave, fill=hair)

    # Eyes and eyebrows.
    ey = cy - ry * rng.uniform(0.08, 0.16)
    gap = rx * rng.uniform(0.38, 0.46)
    iris = rng.choice(_IRIS)
    brow = _scale(hair, 0.7)
    look = rng.uniform(-1.5, 1.5)
    for side in (-1, 1):
        ex = cx + side * gap
        ellipse(ex, ey, rng.uniform(7, 9), rng.uniform(3.5, 4.5), (240, 240, 235), n=16)
        ix, iy = rot(ex + look, ey)
        draw.ellipse((ix - 3.2, iy - 3.2, ix + 3.2, iy + 3.2), fill=iris)
        draw.ellipse((ix - 1.4, iy - 1.4, ix + 1.4, iy + 1.4), fill=(15, 10, 10))
        by = ey - rng.uniform(8, 11)
        draw.line([rot(ex - side * 9, by + 1), rot(ex + side * 1, by - 1.5), rot(ex + side * 10, by + 1.5)],
                  fill=brow, width=3)

    # Nose hint and mouth.
    ny = cy + ry * rng.uniform(0.22, 0.3)
    draw.polygon([rot(cx, ey + 4), rot(cx + 4, ny), rot(cx - 4, ny)], fill=_scale(skin, 0.9))
    for side in (-1, 1):
        nx, nyy = rot(cx + side * 3, ny - 1)
        draw.ellipse((nx - 1.5, nyy - 1, nx + 1.5, nyy + 1), fill=_scale(skin, 0.6))
    my = cy + ry * rng.uniform(0.45, 0.55)
    mw = rx * rng.uniform(0.35, 0.5)
    lips = _jitter(rng, (min(255, skin[0] - 10), int(skin[1] * 0.6), int(skin[2] * 0.6)), 10)
    ellipse(cx, my, mw, rng.uniform(3, 6), lips, n=20)
    smile = rng.uniform(-1.0, 4.0)
    draw.line([rot(cx - mw, my), rot(cx, my + smile), rot(cx + mw, my)], fill=_scale(lips, 0.55), width=1)

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_synthetic(out: str | Path, count: int, *, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``count`` synthetic faces in the CelebA layout (``img_align_celeba/000001.jpg`` ...).

    ``out`` ending in ``.zip`` gives a zip; anything else a folder. Output is byte-identical
    for a given seed, and written to a temporary sibling then renamed so a crash never leaves
    a half-written dataset that looks complete. Returns ``out``.
    """
    if count < 1:
        raise UserError(f"synthetic image count must be at least 1, got {count} (pass --count N with N >= 1)")
    if count > 999_999:
        raise UserError(f"synthetic image count {count} too large for 6-digit CelebA names (use at most 999999)")
    out = Path(out).expanduser()
    as_zip = out.suffix.lower() == ".zip"
    if as_zip and out.is_dir():
        raise UserError(f"cannot write zip {out}: a folder with that name exists (remove it or choose another --out)")
    if not as_zip and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"cannot write synthetic dataset to {out}: it already exists and is not an empty folder "
                        f"(remove it or choose another --out)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create folder {out.parent}: {exc.strerror or exc} (choose another --out)") from None

    def report(done: int) -> None:
        if progress is not None and (done % 100 == 0 or done == count):
            progress(done, count)

    if as_zip:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
                d = zipfile.ZipInfo("img_align_celeba/", _ZIP_TIME)
                d.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(d, b"")
                for i in range(count):
                    info = zipfile.ZipInfo(f"img_align_celeba/{i + 1:06d}.jpg", _ZIP_TIME)
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, _synth_image(seed, i))
                    report(i + 1)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        sub = tmp / "img_align_celeba"
        sub.mkdir()
        for i in range(count):
            (sub / f"{i + 1:06d}.jpg").write_bytes(_synth_image(seed, i))
            report(i + 1)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_batches(dataset: ImageDataset, batches: Sequence[Sequence[int]], threads: int = 0,
                 ahead: int = 2) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """``dataset.load`` of each batch, in order. With ``threads`` > 1 the next ``ahead``
    batches are decoded while the caller computes, each split over the threads (PIL and
    the resize release the GIL): a GPU worker then waits on its decoder far less. The
    result is the same as loading inline."""
    if threads <= 1:
        for batch in batches:
            yield dataset.load(batch)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="load")

    def submit(batch: Sequence[int]) -> list[concurrent.futures.Future[tuple[torch.Tensor, list[int]]]]:
        size = max(1, -(-len(batch) // threads))
        return [pool.submit(dataset.load, list(batch[i:i + size])) for i in range(0, len(batch), size)]

    try:
        todo = iter(batches)
        pending = collections.deque(submit(b) for b in itertools.islice(todo, ahead))
        while pending:
            parts = [f.result() for f in pending.popleft()]
            following = next(todo, None)
            if following is not None:
                pending.append(submit(following))
            yield torch.cat([p[0] for p in parts]), [i for p in parts for i in p[1]]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
