"""Files a run leaves behind: the checkpoint users load and the sample grids people watch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ganns_async.training import Trainer, generate, sample_noise

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
