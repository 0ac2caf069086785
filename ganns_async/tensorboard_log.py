"""``coordinator --tensorboard DIR``: the coordinator's metrics rows, also as TensorBoard scalars.

The database stays the record (``metrics export``, ``watch``, metrics.png read it); this is a
view for people who already live in TensorBoard. Each run writes to ``DIR/run-ID``, so
``tensorboard --logdir DIR`` shows a class's runs side by side. Per step closed:

  loss/g_loss, loss/d_loss   the generator's and the discriminator's loss
  D/d_x, D/d_g_z             D's mean output on real images, on generated ones
  step/images, step/units    images trained on in the step, and the units they came in
  step/epoch                 the epoch the step's data came from
  speed/images_per_s         images of the step over the time since the last step closed
                             (from the second step this coordinator closes on)
  quality/swd                sliced Wasserstein distance x1e3, at the steps it is measured

``--resume`` continues the run's folder with ``purge_step``: the points a crashed or
interrupted coordinator wrote after the step the run resumes at are hidden, and the
replayed steps are written again, so every step keeps one point.

Needs the ``tensorboard`` extra (``torch.utils.tensorboard`` imports it); imported only when
the option is given, so neither the coordinator nor the CLI's start-up pays for it otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ganns_async.errors import UserError

EXTRA_MISSING = "--tensorboard needs the tensorboard extra: pip install 'ganns-async[tensorboard]'"

# metrics column -> TensorBoard tag: the same names as the metrics table and its CSV.
LOSS_TAGS = {"g_loss": "loss/g_loss", "d_loss": "loss/d_loss", "d_x": "D/d_x", "d_g_z": "D/d_g_z"}
SWD_TAG = "quality/swd"
SPEED_TAG = "speed/images_per_s"


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or the one-line error that says which extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(EXTRA_MISSING) from None
    return SummaryWriter


def run_folder(root: Path, run_id: int) -> Path:
    return root / f"run-{run_id}"


class TensorBoardLog:
    """One run's event files. ``resume_step``: the step a resumed run continues from."""

    def __init__(self, root: Path, run_id: int, *, resume_step: int | None = None) -> None:
        writer_class = summary_writer_class()
        self.folder = run_folder(root, run_id)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write TensorBoard logs to {self.folder}: {exc.strerror or exc}") from None
        # SummaryWriter's purge_step T hides every earlier point at step >= T. A run resumed
        # at step S writes S + 1 next; whatever the last coordinator wrote from there on is
        # about to be written again (or was never committed).
        purge = None if resume_step is None else resume_step + 1
        # A step takes tens of seconds in a class: flushing every 10 s keeps TensorBoard current.
        self.writer = writer_class(log_dir=str(self.folder), purge_step=purge, flush_secs=10)
        self._last_step_at: float | None = None

    def step(self, step: int, metrics: Mapping[str, float], *, images: int, units: int, epoch: int) -> None:
        """What the step's metrics row holds (the coordinator calls this once the row is committed)."""
        now = time.monotonic()
        for column, tag in LOSS_TAGS.items():
            if column in metrics:
                self.writer.add_scalar(tag, float(metrics[column]), step)
        self.writer.add_scalar("step/images", images, step)
        self.writer.add_scalar("step/units", units, step)
        self.writer.add_scalar("step/epoch", epoch, step)
        if self._last_step_at is not None and now > self._last_step_at:
            self.writer.add_scalar(SPEED_TAG, images / (now - self._last_step_at), step)
        self._last_step_at = now

    def swd(self, step: int, value: float) -> None:
        self.writer.add_scalar(SWD_TAG, float(value), step)

    def close(self) -> None:
        self.writer.close()
