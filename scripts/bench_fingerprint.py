"""Benchmark the dataset fingerprint: zip (directory only), folder cold (reads every
file), folder warm (checksum cache), against a scan that only lists names and sizes.

Files hold random bytes of about CelebA's size (the fingerprint never decodes them).
Everything, the checksum cache included, lives in a temporary folder. The page cache
is not dropped, so "cold" means "no checksum cache", with the files in memory: on a
real disk the first open of a folder is bound by the disk instead.

    python scripts/bench_fingerprint.py [--count N] [--size BYTES] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganns_async.data import ImageDataset


def make_dataset(root: Path, count: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    folder = root / "folder"
    sub = folder / "img_align_celeba"
    sub.mkdir(parents=True)
    archive = root / "celeba.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            blob = rng.randbytes(max(1, int(rng.gauss(size, size / 5))))
            name = f"{i + 1:06d}.jpg"
            (sub / name).write_bytes(blob)
            zf.writestr(f"img_align_celeba/{name}", blob)
    return folder, archive


def scan_only(folder: Path) -> int:
    """What the fingerprint used to cost: list names and sizes."""
    n = 0
    for _dirpath, _dirs, files in os.walk(folder):
        n += len(files)
        for name in files:
            os.stat(os.path.join(_dirpath, name))
    return n


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="images (CelebA has 202,599)")
    parser.add_argument("--size", type=int, default=8_000, help="mean bytes per image (CelebA: ~7-8 KB)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_fingerprint."))
    cache = work / "xdg_cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        folder, archive = make_dataset(work, args.count, args.size)
        # Files changed under 2 s before they are read are not cached (clock-tick races).
        time.sleep(2.1)
        with ImageDataset.open(archive) as dz:
            fp_zip = dz.fingerprint

        def open_folder() -> str:
            with ImageDataset.open(folder) as ds:
                return ds.fingerprint

        rows = []
        rows.append(("scan names+sizes only", statistics.median(timed(lambda: scan_only(folder))
                                                                for _ in range(args.reps))))
        rows.append(("zip (central directory)", statistics.median(timed(lambda: ImageDataset.open(archive).close())
                                                                  for _ in range(args.reps))))
        cold = []
        for _ in range(args.reps):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(timed(open_folder))
        rows.append(("folder, no cache (reads all)", statistics.median(cold)))
        rows.append(("folder, cached", statistics.median(timed(open_folder) for _ in range(args.reps))))
        assert open_folder() == fp_zip, "zip and folder fingerprints differ"

        total_mb = sum(f.stat().st_size for f in (folder / "img_align_celeba").iterdir()) / 1e6
        print(f"{args.count:,} files, {total_mb:.1f} MB, reps={args.reps}, cpus={os.cpu_count()}")
        width = max(len(r[0]) for r in rows)
        for label, secs in rows:
            print(f"{label.ljust(width)}  {secs * 1e3:9.1f} ms  {secs / args.count * 1e6:7.2f} us/file")
        print(f"fingerprint {fp_zip} (zip == folder)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
