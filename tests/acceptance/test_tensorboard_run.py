"""`coordinator --tensorboard DIR` in a real run: one scalar point per step, equal to the
step's row in the metrics table."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers import WIDTH, _fetch, _spawn, _stop, cli

STEPS = 3


@pytest.mark.slow(8)
def test_coordinator_writes_one_point_per_step(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--db", migrated_url, "--data", str(synth_zip)]
    # The worker starts alongside the coordinator: with one unit a step, nobody waits to plan.
    worker = _spawn("worker", *common, "--name", "tb", "--threads", "1", "--no-tui", log=tmp_path / "worker.log")
    try:
        coord = cli("coordinator", *common, "--no-tui", "--max-steps", str(STEPS), "--unit-size", "8",
                    "--local-steps", "1", "--units-per-step", "1", "--feature-maps", str(WIDTH), "--eval-every", str(STEPS), "--eval-n", "16",
                    "--checkpoint-every", str(STEPS), "--out", str(tmp_path / "out"),
                    "--tensorboard", str(tmp_path / "tb"), timeout=240)
        assert coord.returncode == 0, coord.stdout[-3000:] + coord.stderr
    finally:
        assert _stop(worker) == 0, (tmp_path / "worker.log").read_text()

    (run_id,) = [r["id"] for r in asyncio.run(_fetch(migrated_url, "SELECT id FROM runs"))]
    assert [p.name for p in (tmp_path / "tb").iterdir()] == [f"run-{run_id}"]
    acc = EventAccumulator(str(tmp_path / "tb" / f"run-{run_id}"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    rows = asyncio.run(_fetch(migrated_url, "SELECT * FROM metrics ORDER BY step"))
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for column, tag in (("g_loss", "loss/g_loss"), ("d_loss", "loss/d_loss"), ("d_x", "D/d_x"),
                        ("d_g_z", "D/d_g_z"), ("images", "step/images"), ("units", "step/units"),
                        ("epoch", "step/epoch")):
        # One point per step, the row's value (TensorBoard keeps float32).
        assert got[tag] == [(r["step"], pytest.approx(r[column], rel=1e-6)) for r in steps], tag
    swd = [(r["step"], pytest.approx(r["swd"], rel=1e-6)) for r in rows if r["swd"] is not None]
    assert [s for s, _ in swd] == [0, STEPS]  # the baseline and the measured last step
    assert got["quality/swd"] == swd
    assert [s for s, _ in got["speed/images_per_s"]] == list(range(2, STEPS + 1))
