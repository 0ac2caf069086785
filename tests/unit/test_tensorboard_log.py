"""The TensorBoard writer of `coordinator --tensorboard`: what it writes reads back with
TensorBoard's own reader, a resumed run keeps one point per step, and without the extra the
coordinator refuses in one line. (A coordinator writing it: tests/acceptance/test_tensorboard_run.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ganns_async.cli import app
from ganns_async.errors import UserError
from ganns_async.tensorboard_log import EXTRA_MISSING, LOSS_TAGS, SPEED_TAG, SWD_TAG, TensorBoardLog, run_folder


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``folder``, as TensorBoard shows them (purged points left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"g_loss": 2.0 + step + offset, "d_loss": 1.0 / step + offset, "d_x": 0.75, "d_g_z": 0.25 + offset}


def test_steps_read_back_one_point_each(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path, 7)
    log.swd(0, 263.25)
    for step in (1, 2, 3):
        log.step(step, metrics(step), images=32 * step, units=step, epoch=0)
    log.swd(3, 124.5)
    log.close()

    got = scalars(run_folder(tmp_path, 7))
    for column, tag in LOSS_TAGS.items():
        assert got[tag] == [(s, pytest.approx(metrics(s)[column])) for s in (1, 2, 3)], tag
    assert got["step/images"] == [(1, 32.0), (2, 64.0), (3, 96.0)]
    assert got["step/units"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert got["step/epoch"] == [(1, 0.0), (2, 0.0), (3, 0.0)]
    assert got[SWD_TAG] == [(0, 263.25), (3, 124.5)]
    # A rate needs a previous step: from the second one on.
    assert [s for s, _ in got[SPEED_TAG]] == [2, 3] and all(v > 0 for _, v in got[SPEED_TAG])


def test_a_step_without_losses_writes_the_rest(tmp_path: Path) -> None:
    """A step closed with no usable unit has no loss averages (StepAccumulator.metrics() is {})."""
    log = TensorBoardLog(tmp_path, 1)
    log.step(1, {}, images=0, units=0, epoch=0)
    log.close()
    got = scalars(run_folder(tmp_path, 1))
    assert not set(LOSS_TAGS.values()) & set(got)
    assert got["step/units"] == [(1, 0.0)]


def test_resume_purges_the_steps_after_the_resumed_one(tmp_path: Path) -> None:
    """Steps 1-5 written, the coordinator killed, --resume back at the saved step 3: steps 4
    and 5 are computed again. TensorBoard shows each step once, the new 4 and 5 and a 6."""
    first = TensorBoardLog(tmp_path, 2)
    for step in range(1, 6):
        first.step(step, metrics(step), images=32, units=1, epoch=0)
    first.close()

    resumed = TensorBoardLog(tmp_path, 2, resume_step=3)
    for step in (4, 5, 6):
        resumed.step(step, metrics(step, offset=100.0), images=32, units=1, epoch=0)
    resumed.close()

    got = scalars(run_folder(tmp_path, 2))
    want = [(s, pytest.approx(metrics(s, offset=100.0 if s > 3 else 0.0)["g_loss"])) for s in range(1, 7)]
    assert got["loss/g_loss"] == want
    assert [s for s, _ in got["step/images"]] == [1, 2, 3, 4, 5, 6]


def test_runs_get_folders_of_their_own(tmp_path: Path) -> None:
    for run_id in (1, 2):
        log = TensorBoardLog(tmp_path, run_id)
        log.step(1, metrics(1), images=32, units=1, epoch=0)
        log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-1", "run-2"]
    assert scalars(tmp_path / "run-2")["loss/g_loss"] == [(1, pytest.approx(3.0))]


@pytest.fixture
def no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the extra were not installed: importing it fails, as a missing package does."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)



def test_without_the_extra_the_writer_says_which_to_install(no_tensorboard: None, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        TensorBoardLog(tmp_path, 1)
    assert str(err.value) == EXTRA_MISSING
    assert not any(tmp_path.iterdir())


def test_without_the_extra_the_coordinator_refuses_before_anything(no_tensorboard: None, keep_logging: None,
                                                                   tmp_path: Path) -> None:
    """One line, before the dataset is opened or the database asked (neither exists here)."""
    r = CliRunner().invoke(app, ["coordinator", "--db", "postgresql://u:pw@127.0.0.1:1/none", "--data",
                                 str(tmp_path / "missing.zip"), "--no-tui", "--tensorboard", str(tmp_path / "tb")],
                           prog_name="ganns-async")
    assert r.exit_code == 2, r.output
    assert r.stderr == f"error: {EXTRA_MISSING}\n"
    assert EXTRA_MISSING == "--tensorboard needs the tensorboard extra: pip install 'ganns-async[tensorboard]'"
    assert not (tmp_path / "tb").exists()
