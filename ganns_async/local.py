"""``train-local``: the reference trainer. Same unit schedule, same per-unit code, one process.

It is what a distributed run with ``--max-staleness 0`` computes, without PostgreSQL
(the wire included: results and, in local mode, weights are rounded as ``grad_dtype`` says):
each step takes units ``step*units_per_step ...`` of the schedule (one per simulated
worker), computes each on the current weights (:func:`run_unit`, or :func:`run_local_unit`
for H local steps), averages them weighted by sample count (in float64, like the
coordinator) and steps the run's optimizer. The equivalence tests compare the two.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ganns_async.data import ImageDataset
from ganns_async.outputs import write_checkpoint, write_generator, write_sample_grid
from ganns_async.training import (
    StepAccumulator,
    TrainConfig,
    Trainer,
    broadcast_copies,
    plan_unit,
    run_local_unit,
    run_unit,
    through_wire,
)

log = logging.getLogger("ganns_async.local")


@dataclass
class LocalOptions:
    data: str
    max_steps: int
    out: Path = Path("ganns-local")
    config: TrainConfig = TrainConfig()
    checkpoint_every: int = 10
    threads: int | None = None
    device: str = "cpu"
    on_step: Callable[[int, Trainer, int], None] | None = None  # (step, trainer, images) after each step


@dataclass
class LocalResult:
    trainer: Trainer
    images: int
    seconds: float
    step_ends: list[float]  # perf_counter() when each step finished (for steady-state rates)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_local(opts: LocalOptions) -> LocalResult:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = opts.config
    cfg.check()
    if cfg.auto_width:
        raise ValueError("train-local needs a fixed number of units per step (simulated workers), not auto")
    # Make the folder now: an --out that cannot be one fails before any training, not at the
    # first checkpoint.
    opts.out.mkdir(parents=True, exist_ok=True)
    dataset = ImageDataset.open(opts.data)
    trainer = Trainer(cfg).to(opts.device)
    images_seen = 0
    started = time.perf_counter()
    step_ends: list[float] = []
    try:
        for step in range(opts.max_steps):
            acc = StepAccumulator(step)
            # What workers load: the weights as published (bf16 in local mode by default).
            g, d = broadcast_copies(trainer.g, trainer.d, cfg.broadcast_dtype)
            for j in range(cfg.units_per_step):
                seq = step * cfg.units_per_step + j
                plan = plan_unit(cfg, len(dataset), seq)
                if cfg.local:
                    result, _bad = run_local_unit(g, d, dataset, plan.indices, plan.noise_seed, cfg)
                else:
                    result, _bad = run_unit(g, d, dataset, plan.indices, plan.noise_seed)
                acc.add(seq, through_wire(result, cfg.grad_dtype))  # what the coordinator would decode
            trainer.update(acc)
            images_seen += acc.n
            step_ends.append(time.perf_counter())
            done = step + 1
            epoch = (done * cfg.units_per_step * cfg.images_per_unit - 1) // len(dataset)
            if opts.on_step is not None:
                opts.on_step(done, trainer, images_seen)
            m = acc.metrics()
            log.info("step %d: %d images; d_loss=%.3f g_loss=%.3f D(x)=%.3f D(G(z))=%.3f", done, acc.n,
                     m.get("d_loss", float("nan")), m.get("g_loss", float("nan")),
                     m.get("d_x", float("nan")), m.get("d_g_z", float("nan")))
            if done % opts.checkpoint_every == 0 or done == opts.max_steps:
                write_checkpoint(trainer, opts.out, step=done, epoch=epoch, images_seen=images_seen)
                grid = write_sample_grid(trainer, opts.out, step=done)
                write_generator(trainer, opts.out, {
                    "step": done, "epoch": epoch, "images_seen": images_seen, "workers": 1,
                    "config": dataclasses.asdict(cfg), "sample_name": grid.name,
                    "repo_id": (opts.out / "generator").as_posix()})
    finally:
        dataset.close()
    return LocalResult(trainer, images_seen, time.perf_counter() - started, step_ends)
