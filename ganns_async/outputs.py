"""Files a run leaves behind: the checkpoint users load and the sample grids people watch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ganns_async.errors import UserError
from ganns_async.training import Trainer, generate, sample_noise

log = logging.getLogger("ganns_async.coordinator")

CHECKPOINT_NAME = "checkpoint_latest.pth"


def write_checkpoint(trainer: Trainer, out: Path, *, step: int, epoch: int, images_seen: int,
                     extra: dict[str, Any] | None = None) -> Path:
    """Atomically replace ``out/checkpoint_latest.pth`` (readers never see half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = trainer.checkpoint(step=step, epoch=epoch, images_seen=images_seen, extra=extra)
    path = out / CHECKPOINT_NAME
    tmp = out / (CHECKPOINT_NAME + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


def write_sample_grid(trainer: Trainer, out: Path, *, step: int) -> Path:
    """An 8x8 grid from the run's fixed noise, from the sampling generator in eval mode
    (as users sample the checkpoint's ``generator_state_dict``)."""
    from torchvision.utils import save_image

    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    images = generate(trainer.sampler, sample_noise(trainer.cfg.seed))
    path = samples / f"step_{step:06d}.png"
    tmp = samples / f".step_{step:06d}.png.tmp"
    save_image((images + 1) / 2, str(tmp), nrow=8, padding=2, format="png")
    os.replace(tmp, path)
    return path


class OutputWriter:
    """Checkpoints, sample grids and the metrics plot of a running coordinator.

    Files are written on the train thread, queued behind the step's math, so they show
    exactly the state after that step and never block the event loop.
    """

    def __init__(self, out: Path, train: concurrent.futures.Executor) -> None:
        self.out = out
        self._train = train
        self._pending: list[concurrent.futures.Future[None]] = []

    def queue(self, trainer: Trainer, *, step: int, epoch: int, images_seen: int, run_id: int) -> None:
        fut = self._train.submit(self._write, trainer, step, epoch, images_seen, run_id)
        for done in (f for f in self._pending if f.done()):
            if done.exception() is not None:
                log.error("writing the checkpoint or samples failed: %s", done.exception())
        self._pending = [f for f in self._pending if not f.done()] + [fut]

    def _write(self, trainer: Trainer, step: int, epoch: int, images_seen: int, run_id: int) -> None:
        ckpt = write_checkpoint(trainer, self.out, step=step, epoch=epoch, images_seen=images_seen,
                                extra={"run_id": int(run_id)})
        grid = write_sample_grid(trainer, self.out, step=step)
        log.info("wrote %s and %s", ckpt, grid)

    async def wait(self, *, strict: bool = False) -> None:
        """Wait for queued files; ``strict`` turns a failed write into a UserError."""
        pending, self._pending = self._pending, []
        for fut in pending:
            try:
                await asyncio.wrap_future(fut)
            except OSError as exc:
                if strict:
                    raise UserError(f"could not write the checkpoint or samples under {self.out}: {exc}") from exc
                log.error("writing the checkpoint or samples failed: %s", exc)

    async def metrics_plot(self, rows: list[dict[str, Any]], run_id: int) -> None:
        from ganns_async.plots import write_metrics_plot

        await asyncio.get_running_loop().run_in_executor(
            self._train, lambda: write_metrics_plot(rows, self.out / "metrics.png", title=f"ganns-async run {run_id}"))
