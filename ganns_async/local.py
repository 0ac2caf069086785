"""``train-local``: the reference trainer. Same unit schedule, same per-unit code, one process.

It is what a distributed run with ``--max-staleness 0`` computes, without PostgreSQL:
each step takes units ``step*units_per_step ...`` of the schedule, computes each with
:func:`compute_unit` on the current weights, averages them weighted by sample count
(in float64, like the coordinator) and steps Adam. The equivalence tests compare the two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ganns_async.data import ImageDataset
from ganns_async.outputs import write_checkpoint, write_sample_grid
from ganns_async.training import StepAccumulator, TrainConfig, Trainer, plan_unit, run_unit

log = logging.getLogger("ganns_async.local")


@dataclass
class LocalOptions:
    data: str
    max_steps: int
    out: Path = Path("ganns-local")
    config: TrainConfig = TrainConfig()
    checkpoint_every: int = 10
    threads: int | None = None


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
    dataset = ImageDataset.open(opts.data)
    trainer = Trainer(cfg)
    images_seen = 0
    started = time.perf_counter()
    step_ends: list[float] = []
    try:
        for step in range(opts.max_steps):
            acc = StepAccumulator(step)
            for j in range(cfg.units_per_step):
                seq = step * cfg.units_per_step + j
                plan = plan_unit(cfg, len(dataset), seq)
                result, _bad = run_unit(trainer.g, trainer.d, dataset, plan.indices, plan.noise_seed)
                acc.add(seq, result)
            if acc.n > 0:
                trainer.apply(acc.mean_grads(), acc.mean_buffers())
            images_seen += acc.n
            step_ends.append(time.perf_counter())
            done = step + 1
            epoch = (done * cfg.units_per_step * cfg.unit_size - 1) // len(dataset)
            m = acc.metrics()
            log.info("step %d: %d images; d_loss=%.3f g_loss=%.3f D(x)=%.3f D(G(z))=%.3f", done, acc.n,
                     m.get("d_loss", float("nan")), m.get("g_loss", float("nan")),
                     m.get("d_x", float("nan")), m.get("d_g_z", float("nan")))
            if done % opts.checkpoint_every == 0 or done == opts.max_steps:
                write_checkpoint(trainer, opts.out, step=done, epoch=epoch, images_seen=images_seen)
                write_sample_grid(trainer, opts.out, step=done)
    finally:
        dataset.close()
    return LocalResult(trainer, images_seen, time.perf_counter() - started, step_ends)
