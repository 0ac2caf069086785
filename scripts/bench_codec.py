"""Benchmark the payload codec on real DCGAN gradients, fp32 vs bf16.

Gradients (not weights) are what workers push most often, so the figures are
measured on one real training step's G and D gradients.  MB/s is relative to
the raw fp32 bytes in both modes, so the two rows compare the work done for
the same gradients.

    python scripts/bench_codec.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganns_async.codec import decode_tensors, encode_tensors, tensor_spec  # noqa: E402
from ganns_async.model import IMAGE_SIZE, LATENT_DIM, NUM_CHANNELS, build_models  # noqa: E402

MB = 1e6
BATCH = 64


def dcgan_gradients(seed: int = 0) -> dict[str, torch.Tensor]:
    """One step's gradients: D on real->1 and fake->0, G through D(G(z))->1."""
    g, d = build_models(seed)
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand(BATCH, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
    z = torch.randn(BATCH, LATENT_DIM, 1, 1, generator=gen)
    loss_fn = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(BATCH), torch.zeros(BATCH)

    g_named = [(f"G.{n}", p) for n, p in g.named_parameters() if p.requires_grad]
    d_named = [(f"D.{n}", p) for n, p in d.named_parameters() if p.requires_grad]

    fake = g(z)
    d_loss = loss_fn(d(real), ones) + loss_fn(d(fake.detach()), zeros)
    d_grads = torch.autograd.grad(d_loss, [p for _, p in d_named])
    g_loss = loss_fn(d(fake), ones)
    g_grads = torch.autograd.grad(g_loss, [p for _, p in g_named])

    grads = dict(zip((n for n, _ in g_named), g_grads))
    grads.update(zip((n for n, _ in d_named), d_grads))
    return {k: v.detach() for k, v in grads.items()}


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--level", type=int, default=1, help="zstd level (default 1)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    grads = dcgan_gradients(0)
    n_params = sum(t.numel() for t in grads.values())
    raw_fp32 = n_params * 4
    spec = tensor_spec(grads)
    print(f"DCGAN gradients: {len(grads)} tensors, {n_params:,} params, "
          f"{raw_fp32 / MB:.2f} MB raw fp32; reps={args.reps}, zstd level {args.level}, "
          f"torch threads {torch.get_num_threads()}")

    header = ("dtype", "raw MB", "comp MB", "ratio", "enc ms", "dec ms", "enc MB/s", "dec MB/s")
    rows = []
    for mode, item in (("fp32", 4), ("bf16", 2)):
        blob = encode_tensors(grads, float_dtype=mode, level=args.level)
        decode_tensors(blob, expected=spec)            # warm-up and sanity check
        enc = median_time(lambda: encode_tensors(grads, float_dtype=mode, level=args.level), args.reps)
        dec = median_time(lambda: decode_tensors(blob, expected=spec), args.reps)
        raw = n_params * item
        rows.append((mode, f"{raw / MB:.2f}", f"{len(blob) / MB:.2f}", f"{raw_fp32 / len(blob):.2f}x",
                     f"{enc * 1e3:.1f}", f"{dec * 1e3:.1f}",
                     f"{raw_fp32 / MB / enc:.0f}", f"{raw_fp32 / MB / dec:.0f}"))

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("ratio = raw fp32 bytes / compressed bytes; MB/s relative to raw fp32 bytes (1 MB = 1e6 B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
