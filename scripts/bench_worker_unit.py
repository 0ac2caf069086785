"""Where a worker's time goes for one unit: loading images, the GAN math, encoding the gradient.

Runs the worker's own code (``run_unit`` and the codec) on one device, no database, and
prints the median of ``--reps`` repetitions for each unit size, plus the encode and decode
time and size of the gradient payload in fp32 and bf16. On a GPU this shows whether the
math or the wire format is the bottleneck.

``--feature-maps`` compares the networks' widths (the README's "Slow machines" figures:
``--sizes 64 --feature-maps 64,32,16``).

Usage: python scripts/bench_worker_unit.py [--device auto] [--sizes 64,512] [--feature-maps 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ganns_async import codec
from ganns_async.data import ImageDataset, write_synthetic
from ganns_async.hardware import pick_device
from ganns_async.model import build_models
from ganns_async.training import gradient_spec, run_unit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(fn, reps: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="64,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--feature-maps", default="64", help="widths to measure, comma-separated (default: 64)")
    args = ap.parse_args()
    widths = [int(w) for w in args.feature_maps.split(",")]
    device = pick_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench_worker_unit: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{time.strftime('%Y-%m-%d')}, median of {args.reps}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "faces.zip"
        write_synthetic(data, max(sizes))
        dataset = ImageDataset.open(str(data))
        print(f"{'width':>5} {'unit':>5} {'load+math s':>11} {'img/s':>8} | {'dtype':>5} {'MB':>6} "
              f"{'encode s':>9} {'decode s':>9}")
        for width, n in ((w, n) for w in widths for n in sizes):
            g, d = build_models(0, width)
            g.to(device)
            d.to(device)
            spec = gradient_spec(g, d)
            indices = list(range(n))

            def unit():  # type: ignore[no-untyped-def]
                result, _ = run_unit(g, d, dataset, indices, 12345)
                _sync(device)
                return result

            unit()  # warm-up: cuDNN autotuning, allocator
            t_math, result = _median(unit, args.reps)
            for dtype in ("fp32", "bf16"):
                meta = {"n_samples": n, "metrics": result.metrics, "skipped": 0}  # type: ignore[attr-defined]
                t_enc, blob = _median(lambda: codec.encode_tensors(result.tensors(), meta=meta,  # type: ignore[attr-defined]
                                                                   float_dtype=dtype), args.reps)
                t_dec, _ = _median(lambda: codec.decode_tensors(blob, expected=spec), args.reps)  # type: ignore[arg-type]
                print(f"{width:>5} {n:>5} {t_math:>11.4f} {n / t_math:>8.0f} | {dtype:>5} {len(blob) / 1e6:>6.2f} "  # type: ignore[arg-type]
                      f"{t_enc:>9.4f} {t_dec:>9.4f}", flush=True)
        dataset.close()


if __name__ == "__main__":
    main()
