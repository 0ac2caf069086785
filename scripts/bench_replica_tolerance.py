"""How far apart two honest results of the same unit are: the tolerance replication needs.

Computes units on two configurations (devices, thread counts, TF32, deterministic kernels)
and prints, per unit kind, whether they are bitwise equal, their cosine similarity and the
largest per-tensor relative L2 error (ganns_async.replication.compare), plus time per unit.

    python scripts/bench_replica_tolerance.py                      # CPU: 1 thread vs 2 threads
    python scripts/bench_replica_tolerance.py --device cuda        # adds CUDA (TF32 on/off,
                                                                   #   deterministic on/off) vs CPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ganns_async.data import ImageDataset, write_synthetic
from ganns_async.replication import EXACT_TOLERANCE, LOCAL_TOLERANCE, compare
from ganns_async.training import TrainConfig, Trainer, plan_unit, run_local_unit, run_unit


def compute(trainer: Trainer, ds: ImageDataset, cfg: TrainConfig, seq: int, device: str, threads: int,
            tf32: bool, deterministic: bool):  # type: ignore[no-untyped-def]
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    g, d = copy.deepcopy(trainer.g).to(device), copy.deepcopy(trainer.d).to(device)
    plan = plan_unit(cfg, len(ds), seq)
    started = time.perf_counter()
    if cfg.local:
        result, _ = run_local_unit(g, d, ds, plan.indices, plan.noise_seed, cfg)
    else:
        result, _ = run_unit(g, d, ds, plan.indices, plan.noise_seed)
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--units", type=int, default=3)
    ap.add_argument("--local-steps", default="1,32", help="unit kinds to measure [default: 1,32]")
    ap.add_argument("--unit-size", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "faces.zip"
        write_synthetic(data, 1024, seed=5)
        ds = ImageDataset.open(data)
        pairs = [("cpu 1 thread", ("cpu", 1, False, False)), ("cpu 2 threads", ("cpu", 2, False, False))]
        if args.device == "cuda":
            pairs += [("cuda tf32", ("cuda", 1, True, False)), ("cuda tf32 again", ("cuda", 1, True, False)),
                      ("cuda tf32 deterministic", ("cuda", 1, True, True)),
                      ("cuda tf32 deterministic again", ("cuda", 1, True, True)),
                      ("cuda fp32 deterministic", ("cuda", 1, False, True))]
        print(f"tolerances: exact {EXACT_TOLERANCE}, local {LOCAL_TOLERANCE}")
        print("| H | config vs cpu 1 thread | bitwise | min cosine | max rel L2 | max norm ratio | s/unit |")
        print("|---|---|---|---|---|---|---|")
        for h in (int(x) for x in args.local_steps.split(",")):
            cfg = TrainConfig(seed=1, unit_size=args.unit_size, units_per_step=2, max_staleness=0, local_steps=h,
                              grad_dtype="fp32")
            trainer = Trainer(cfg)
            results = {name: [compute(trainer, ds, cfg, seq, *conf) for seq in range(args.units)]
                       for name, conf in pairs}
            base = results[pairs[0][0]]
            for name, runs in results.items():
                if name == pairs[0][0]:
                    continue
                agreements = [compare(b[0], r[0]) for b, r in zip(base, runs)]
                times = [r[1] for r in runs]
                worst = max(agreements, key=lambda a: a.max_rel_l2)
                print(f"| {h} | {name} | {all(a.bitwise for a in agreements)} | "
                      f"{min(a.cosine for a in agreements):.6f} | {worst.max_rel_l2:.3g} ({worst.worst}) | "
                      f"{max(a.norm_ratio for a in agreements):.4f} | {statistics.median(times):.3f} |", flush=True)
            if args.device == "cuda":
                for first, second in (("cuda tf32", "cuda tf32 again"),
                                      ("cuda tf32 deterministic", "cuda tf32 deterministic again")):
                    same = all(compare(a[0], b[0]).bitwise for a, b in zip(results[first], results[second]))
                    print(f"H={h}: two runs of '{first}' bitwise equal: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
