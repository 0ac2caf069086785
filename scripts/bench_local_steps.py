"""Quality against images and against bytes: exact mode versus local steps.

Each configuration trains the same number of images on the same synthetic faces with
``train-local``'s simulation of W workers (a distributed run with the same settings lands on
the same weights: tests/acceptance/test_equivalence.py), and records the sliced Wasserstein distance
(x1e3, lower is better) of the raw generator and of its moving average at fixed image
counts. Bytes through PostgreSQL per image come from the real blobs' sizes:

    per round = weights written once + W x (weights downloaded + result uploaded
                + result read by the coordinator) + optimizer state / --state-every

Usage (the README's figures; about 4 minutes on an H100, hours on two CPU cores):

    python scripts/bench_local_steps.py --device cuda
    python scripts/bench_local_steps.py --configs H=1,H=32 --images 8192   # a quick look

A configuration is ``H=<local steps>`` with optional ``:outer=<lr>,<momentum>``,
``:workers=<n>``, ``:unit=<images per inner step>`` and ``:wire=fp32`` (default bf16, as a distributed run sends: results, and
in local mode the weights too); ``H=1`` is the exact mode (averaged gradients, Adam).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ganns_async import codec  # noqa: E402
from ganns_async.data import ImageDataset, write_synthetic  # noqa: E402
from ganns_async.local import LocalOptions, train_local  # noqa: E402
from ganns_async.quality import evaluate_generator  # noqa: E402
from ganns_async.training import TrainConfig, Trainer, plan_unit, run_local_unit, run_unit  # noqa: E402

STATE_EVERY = 25  # the coordinator's default --state-every


@dataclass
class Config:
    label: str
    local_steps: int
    workers: int
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    wire: str = "bf16"
    unit_size: int | None = None  # default: --unit-size


@dataclass
class Outcome:
    config: Config
    kb_per_image: float = 0.0
    blob_mb: dict[str, float] = field(default_factory=dict)
    swd_raw: dict[int, float] = field(default_factory=dict)  # images -> SWD of raw G
    swd_ema: dict[int, float] = field(default_factory=dict)  # images -> SWD of the moving average
    seconds: float = 0.0


def parse_config(text: str, workers: int) -> Config:
    parts = text.split(":")
    if not parts[0].startswith("H="):
        raise SystemExit(f"bad config {text!r}: start with H=<local steps>")
    cfg = Config(text, int(parts[0][2:]), workers)
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key == "outer":
            lr, _, momentum = value.partition(",")
            cfg.outer_lr, cfg.outer_momentum = float(lr), float(momentum or 0)
        elif key == "workers":
            cfg.workers = int(value)
        elif key == "wire":
            cfg.wire = value
        elif key == "unit":
            cfg.unit_size = int(value)
        else:
            raise SystemExit(f"bad config {text!r}: unknown {key!r}")
    return cfg


def bytes_per_image(cfg: TrainConfig, trainer: Trainer, dataset: ImageDataset) -> tuple[float, dict[str, float]]:
    """KB through PostgreSQL per trained image, from blobs encoded as the system encodes them."""
    weights = len(codec.encode_tensors(trainer.state(), float_dtype=cfg.broadcast_dtype))
    plan = plan_unit(cfg, len(dataset), 0)
    if cfg.local:
        result, _ = run_local_unit(trainer.g, trainer.d, dataset, plan.indices, plan.noise_seed, cfg)
    else:
        result, _ = run_unit(trainer.g, trainer.d, dataset, plan.indices, plan.noise_seed)
    upload = len(codec.encode_tensors(result.tensors(), meta={"n_samples": result.n_samples},
                                      float_dtype=cfg.grad_dtype))
    opt_tensors, meta = trainer.optimizer_tensors()
    if cfg.broadcast_dtype != "fp32":
        opt_tensors.update({f"MASTER.{k}": v for k, v in trainer.state().items()})  # as the coordinator saves
    state = len(codec.encode_tensors(opt_tensors, meta=meta))
    w = cfg.units_per_step
    per_round = weights + w * (weights + 2 * upload) + state / STATE_EVERY
    images = w * cfg.images_per_unit
    mb = {"weights": weights / 1e6, "upload": upload / 1e6, "state": state / 1e6}
    return per_round / images / 1e3, mb


def run(c: Config, args: argparse.Namespace, data: Path, seed: int) -> Outcome:
    cfg = TrainConfig(seed=seed, unit_size=c.unit_size or args.unit_size, units_per_step=c.workers, max_staleness=0,
                      local_steps=c.local_steps, outer_lr=c.outer_lr, outer_momentum=c.outer_momentum,
                      grad_dtype=c.wire)
    per_round = cfg.units_per_step * cfg.images_per_unit
    if args.images % per_round or args.eval_every % per_round:
        raise SystemExit(f"{c.label}: --images and --eval-every must be multiples of {per_round} (one round)")
    out = Outcome(c)
    dataset = ImageDataset.open(str(data))

    def evaluate(trainer: Trainer, images: int) -> None:
        raw = evaluate_generator(trainer.g, dataset, n=args.eval_n, seed=0)["swd_avg"]
        ema = evaluate_generator(trainer.sampler, dataset, n=args.eval_n, seed=0)["swd_avg"]
        out.swd_raw[images], out.swd_ema[images] = raw, ema

    first = Trainer(cfg).to(args.device)
    evaluate(first, 0)
    spent = [0.0]
    mark = [time.perf_counter()]

    def on_step(step: int, trainer: Trainer, images: int) -> None:
        if images % args.eval_every == 0:
            spent[0] += time.perf_counter() - mark[0]
            evaluate(trainer, images)
            mark[0] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        result = train_local(LocalOptions(data=str(data), max_steps=args.images // per_round, out=Path(tmp),
                                          config=cfg, checkpoint_every=10**9, device=args.device,
                                          on_step=on_step))
    out.seconds = spent[0] + (time.perf_counter() - mark[0])
    out.kb_per_image, out.blob_mb = bytes_per_image(replace(cfg), result.trainer, dataset)
    dataset.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="H=1,H=4,H=8,H=16,H=32,H=32:outer=0.7,0.9,H=16:outer=0.7,0.9,H=32:workers=1",
                    help="comma-separated configurations (see the module docstring)")
    ap.add_argument("--workers", type=int, default=2, help="simulated workers unless a config says otherwise")
    ap.add_argument("--unit-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=49152, help="images trained by every configuration")
    ap.add_argument("--eval-every", type=int, default=16384, help="SWD every N images")
    ap.add_argument("--eval-n", type=int, default=512)
    ap.add_argument("--dataset-size", type=int, default=4096)
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds; SWD is the median over them")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # "H=32:outer=0.7,0.9" holds a comma: rejoin the pieces that do not start a config.
    specs: list[str] = []
    for piece in args.configs.split(","):
        if piece.startswith("H=") or not specs:
            specs.append(piece)
        else:
            specs[-1] += "," + piece
    configs = [parse_config(s, args.workers) for s in specs]
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "faces.zip"
        write_synthetic(data, args.dataset_size)
        print(f"bench_local_steps: {args.images} images per configuration, unit {args.unit_size} images, "
              f"{args.dataset_size} synthetic faces, SWD x1e3 on {args.eval_n} images, seeds {seeds}, "
              f"device {args.device}", flush=True)
        results: list[list[Outcome]] = []
        for c in configs:
            runs = []
            for seed in seeds:
                o = run(c, args, data, seed)
                runs.append(o)
                marks = sorted(o.swd_ema)
                print(f"  {c.label:<22} seed {seed}: raw " + " / ".join(f"{o.swd_raw[m]:.0f}" for m in marks)
                      + "  avg " + " / ".join(f"{o.swd_ema[m]:.0f}" for m in marks)
                      + f"  ({o.seconds:.0f}s, {o.kb_per_image:.1f} KB/img)", flush=True)
            results.append(runs)
    marks = sorted(results[0][0].swd_ema)
    print()
    print("| run | workers | KB per image | MB through the DB at " + " / ".join(f"{m // 1000}k" for m in marks)
          + " images | SWD raw G | SWD moving average | s |")
    print("|---|---|---|---|---|---|---|")
    for runs in results:
        o = runs[0]
        c = o.config
        kb = o.kb_per_image
        raw = " / ".join(f"{statistics.median(r.swd_raw[m] for r in runs):.0f}" for m in marks)
        ema = " / ".join(f"{statistics.median(r.swd_ema[m] for r in runs):.0f}" for m in marks)
        mb = " / ".join(f"{kb * m / 1e3:.0f}" for m in marks)
        secs = statistics.median(r.seconds for r in runs)
        print(f"| {c.label} | {c.workers} | {kb:.1f} | {mb} | {raw} | {ema} | {secs:.0f} |")
    b = results[0][0].blob_mb
    print(f"\nblobs of the first run (MB): weights {b['weights']:.1f}, one unit's upload {b['upload']:.1f}, "
          f"optimizer state {b['state']:.1f} every {STATE_EVERY} rounds")


if __name__ == "__main__":
    main()
