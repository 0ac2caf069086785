"""Files a run leaves behind: the checkpoint users load and the sample grids people watch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ganns_async.errors import UserError
from ganns_async.training import Trainer, generate, sample_noise

log = logging.getLogger("ganns_async.coordinator")

CHECKPOINT_NAME = "checkpoint_latest.pth"
GENERATOR_DIR = "generator"


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


def write_generator(trainer: Trainer, out: Path, card_info: Mapping[str, Any]) -> Path:
    """``out/generator/``: ``config.json``, ``model.safetensors`` (the sampling generator, as
    in the checkpoint's ``generator_state_dict``) and ``README.md``, the Hub repository's model
    files, loadable with ``Generator.from_pretrained(out / "generator")``.

    Each file is replaced atomically. An existing README.md keeps its prose (see
    :func:`ganns_async.model_card.merge_card`).
    """
    from ganns_async.model_card import CARD_LOCK, merge_card, render_card

    folder = out / GENERATOR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".generator-", dir=out))
    try:
        fresh = render_card(card_info)
        # Our card first: save_pretrained keeps a README.md it finds instead of rendering its own.
        (tmp / "README.md").write_text(fresh, encoding="utf-8")
        trainer.sampler.save_pretrained(tmp)  # config.json + model.safetensors
        for name in ("model.safetensors", "config.json"):
            os.chmod(tmp / name, 0o644)  # safetensors creates its file 0600; the folder is for sharing
            os.replace(tmp / name, folder / name)
        with CARD_LOCK:
            card = folder / "README.md"
            previous = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
            (tmp / "card").write_text(merge_card(previous, fresh), encoding="utf-8")
            os.chmod(tmp / "card", 0o644)
            os.replace(tmp / "card", card)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class OutputWriter:
    """Checkpoints, sample grids and the metrics plot of a running coordinator.

    Files are written on the train thread, queued behind the step's math, so they show
    exactly the state after that step and never block the event loop. A failed write (a full
    disk, a folder made read-only) never stops training: :meth:`news` tells the coordinator
    once that writing fails, and once that it works again, and :attr:`failing` asks it to
    write again at the next step instead of waiting for the next checkpoint.
    """

    def __init__(self, out: Path, train: concurrent.futures.Executor) -> None:
        self.out = out
        self._train = train
        self._pending: list[concurrent.futures.Future[None]] = []
        self.failing: str | None = None  # the last write's error, until one succeeds
        self._said: str | None = None  # what news() last reported

    def queue(self, trainer: Trainer, *, step: int, epoch: int, images_seen: int, run_id: int,
              card_info: Mapping[str, Any] | None = None) -> None:
        fut = self._train.submit(self._write, trainer, step, epoch, images_seen, run_id, dict(card_info or {}))
        self._pending = [f for f in self._pending if not f.done()] + [fut]

    def _write(self, trainer: Trainer, step: int, epoch: int, images_seen: int, run_id: int,
               card_info: dict[str, Any]) -> None:
        try:
            ckpt = write_checkpoint(trainer, self.out, step=step, epoch=epoch, images_seen=images_seen,
                                    extra={"run_id": int(run_id)})
            grid = write_sample_grid(trainer, self.out, step=step)
            card_info.update(step=step, epoch=epoch, images_seen=images_seen, sample_name=grid.name,
                             has_metrics=(self.out / "metrics.png").is_file())
            write_generator(trainer, self.out, card_info)
        except OSError as exc:
            self.failing = f"{type(exc).__name__}: {exc}"
            raise
        self.failing = None
        log.info("wrote %s, %s and %s/", ckpt, grid, self.out / GENERATOR_DIR)

    def news(self) -> str | None:
        """What changed since last asked: writing started failing, or works again."""
        if self.failing is not None and self._said is None:
            self._said = self.failing
            return (f"cannot write the checkpoint or samples under {self.out} ({self.failing}); "
                    "training goes on and the files are written again at every step until it works")
        if self.failing is None and self._said is not None:
            self._said = None
            return f"the checkpoint and samples under {self.out} are written again"
        return None

    async def wait(self, *, strict: bool = False) -> None:
        """Wait for queued files; ``strict`` turns a failed write into a UserError."""
        pending, self._pending = self._pending, []
        for fut in pending:
            try:
                await asyncio.wrap_future(fut)
            except OSError as exc:
                if strict:
                    raise UserError(f"could not write the checkpoint or samples under {self.out}: {exc}; "
                                    "the run is saved in the database: fix the folder and run "
                                    "`ganns-async coordinator --resume` to write them") from exc
                log.error("writing the checkpoint or samples failed: %s", exc)

    async def metrics_plot(self, rows: list[dict[str, Any]], run_id: int) -> None:
        from ganns_async.plots import write_metrics_plot

        def write() -> None:
            try:
                write_metrics_plot(rows, self.out / "metrics.png", title=f"ganns-async run {run_id}")
            except OSError as exc:
                self.failing = f"{type(exc).__name__}: {exc}"
                log.error("writing the metrics plot failed: %s", exc)

        await asyncio.get_running_loop().run_in_executor(self._train, write)
