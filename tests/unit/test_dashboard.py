"""The dashboards: pure views of fixed snapshots, rendered to a recording Console."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from rich.console import Console

from ganns_async.dashboard import (
    ClusterSnapshot,
    EventLine,
    StepPoint,
    WorkerRow,
    WorkerSnapshot,
    format_duration,
    half_block_image,
    render_cluster,
    render_worker,
    sparkline,
)

TICKS = set("▁▂▃▄▅▆▇█")

WORKERS = (
    WorkerRow("alice", "cuda:0", "computing", 41, 10_496, 182.4, 0.41, 0.8),
    WorkerRow("bob", "cpu", "uploading", 12, 3_072, 21.0, 0.12, 1.5),
    WorkerRow("carol", "mps", "idle", 20, 5_120, 0.0, 0.20, 2.0),
    WorkerRow("dave", "cuda", "stale", 9, 2_304, 0.0, 0.09, 47.0),
    WorkerRow("erin", "cpu", "offline", 18, 4_608, 0.0, 0.18, 725.0),
)

EVENTS = (
    EventLine(2, "step", "step 12 applied from 4 units"),
    EventLine(9, "join", "frank joined on cuda:0"),
    EventLine(12, "requeue", "unit 4 lease expired on dave"),
    EventLine(31, "rejected", "unit 7 from bob: stale weights (step 10)"),
    EventLine(65, "leave", "erin left"),
    EventLine(125, "quality", "SWD 0.412 at step 10 (best so far)"),
    EventLine(300, "stale", "dave missed 3 heartbeats"),
    EventLine(3720, "run", "run 3 started: 40 steps, batch 256"),
    EventLine(3800, "coordinator", "coordinator started"),
)


def history(n: int = 50) -> tuple[StepPoint, ...]:
    points = []
    for step in range(n):
        t = step / (n - 1)
        points.append(
            StepPoint(
                step=step,
                g_loss=3.0 * math.exp(-2 * t) + 0.7 + 0.2 * math.sin(step / 2),
                d_loss=1.3 - 0.5 * t + 0.05 * math.cos(step / 3),
                d_x=0.6 + 0.3 * t,
                d_g_z=0.4 - 0.3 * t,
                swd=(0.9 - 0.5 * t) if step % 10 == 0 else None,
            )
        )
    return tuple(points)


def gradient(size: int = 64) -> np.ndarray:
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = ramp[None, :]
    image[..., 1] = ramp[:, None]
    image[..., 2] = 128
    return image


def cluster(**changes: object) -> ClusterSnapshot:
    base = dict(
        title="coordinator",
        run_id=3,
        status="running",
        step=12,
        max_steps=40,
        epoch=2,
        epoch_fraction=0.45,
        images_per_s=203.4,
        effective_batch=256,
        since_last_step_s=3.2,
        eta_s=125.0,
        db_ok=True,
        db_latency_ms=1.2,
        workers=WORKERS,
        history=history(),
        events=EVENTS,
        sample=gradient(),
    )
    base.update(changes)
    return ClusterSnapshot(**base)  # type: ignore[arg-type]


def worker(**changes: object) -> WorkerSnapshot:
    base = dict(
        name="bob",
        device="cuda:0",
        connection="connected",
        run_id=3,
        state="computing",
        unit_id=42,
        unit_step=12,
        unit_progress=0.63,
        units_done=12,
        images_done=3_072,
        images_per_s=21.0,
        rank=2,
        workers_total=7,
        recent_losses=tuple((1.2 - 0.01 * i, 2.5 + 0.3 * math.sin(i)) for i in range(20)),
        message="uploading unit 41 took 0.4 s",
    )
    base.update(changes)
    return WorkerSnapshot(**base)  # type: ignore[arg-type]


def console(width: int) -> Console:
    return Console(record=True, width=width, color_system="truecolor")


def text_of(renderable: object, width: int) -> tuple[str, Console]:
    c = console(width)
    c.print(renderable)
    return c.export_text(clear=False), c


def assert_fits(text: str, width: int, height: int) -> None:
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height, f"{len(lines)} lines > {height}:\n{text}"
    assert all(len(line.rstrip()) <= width for line in lines)


# --------------------------------------------------------------------------- cluster view


def test_cluster_shows_everything_at_100x30() -> None:
    text, _ = text_of(render_cluster(cluster(sample=None), 100, 30), 100)
    assert_fits(text, 100, 30)
    for w in WORKERS:
        assert w.name in text
        assert w.state in text
    assert "step 12/40" in text
    assert "epoch 2" in text
    assert "203.4 img/s" in text
    assert "step 256 img" in text
    assert "ETA 2m05s" in text
    assert "last step 3s ago" in text
    assert "db ok 1.2 ms" in text
    assert "run 3" in text and "running" in text
    for event in EVENTS[:3]:
        assert event.message in text
    assert "requeue" in text and "rejected" in text
    best_swd = min(p.swd for p in history() if p.swd is not None)
    for label in ("G loss", "D loss", "D(x)", "D(G(z))", "SWD", f"best {best_swd:.3f}"):
        assert label in text
    assert TICKS & set(text)


def test_offline_rows_come_last() -> None:
    text, _ = text_of(render_cluster(cluster(sample=None), 100, 30), 100)
    order = [text.index(name) for name in ("alice", "carol", "erin")]
    assert order == sorted(order)
    assert "offline" in text
    assert "1 offline" in text


def test_every_event_kind_when_room() -> None:
    text, _ = text_of(render_cluster(cluster(sample=None, workers=WORKERS[:2]), 100, 40), 100)
    for event in EVENTS:
        assert event.kind in text
        assert event.message in text


def test_event_kind_colours() -> None:
    _, c = text_of(render_cluster(cluster(sample=None), 100, 30), 100)
    styled = c.export_text(styles=True)
    assert re.search(r"\x1b\[[0-9;]*31m[^\x1b]*rejected", styled)  # red
    assert re.search(r"\x1b\[[0-9;]*33m[^\x1b]*requeue", styled)  # yellow
    assert re.search(r"\x1b\[[0-9;]*32m[^\x1b]*join", styled)  # green


def test_db_down_is_shown() -> None:
    text, _ = text_of(render_cluster(cluster(db_ok=False, db_latency_ms=None), 100, 30), 100)
    assert "db DOWN" in text
    assert "db ok" not in text


def test_unbounded_run_and_empty_snapshot() -> None:
    snap = cluster(
        run_id=None,
        status="waiting for a run",
        step=0,
        max_steps=None,
        eta_s=None,
        since_last_step_s=None,
        workers=(),
        history=(),
        events=(),
        sample=None,
    )
    text, _ = text_of(render_cluster(snap, 80, 24), 80)
    assert_fits(text, 80, 24)
    assert "step 0" in text and "step 0/" not in text
    assert "ETA —" in text
    assert "no workers yet" in text
    assert "waiting for a run" in text


def test_too_many_workers_says_how_many_more() -> None:
    many = tuple(WorkerRow(f"student{i:02d}", "cpu", "computing", i, 256 * i, 10.0, 1 / 30, 1.0) for i in range(30))
    text, _ = text_of(render_cluster(cluster(workers=many), 100, 30), 100)
    assert_fits(text, 100, 30)
    match = re.search(r"\+(\d+) more", text)
    assert match
    shown = sum(1 for i in range(30) if f"student{i:02d}" in text)
    assert shown + int(match.group(1)) == 30
    assert "student29" in text  # most images first


def test_80x24_keeps_names_and_step() -> None:
    text, _ = text_of(render_cluster(cluster(), 80, 24), 80)
    assert_fits(text, 80, 24)
    for w in WORKERS:
        assert w.name in text
    assert "step 12/40" in text
    assert "events" in text  # shortened, not gone


def test_shrinking_order_sample_then_events_then_history() -> None:
    tall, _ = text_of(render_cluster(cluster(workers=WORKERS[:2]), 100, 60), 100)
    assert "latest sample" in tall and "▀" in tall
    short, _ = text_of(render_cluster(cluster(workers=WORKERS[:2]), 100, 24), 100)
    assert "▀" not in short
    assert "D(G(z))" in short and "events" in short
    tiny, _ = text_of(render_cluster(cluster(), 80, 16), 80)
    assert_fits(tiny, 80, 16)
    assert "G loss" in tiny and "D(G(z))" not in tiny
    assert "alice" in tiny


@pytest.mark.parametrize("size", [(60, 15), (80, 24), (100, 30), (120, 40), (140, 30), (200, 50)])
def test_any_size_fits(size: tuple[int, int]) -> None:
    w, h = size
    for snap in (cluster(), cluster(leaderboard=True, title="watch"), cluster(sample=None)):
        text, _ = text_of(render_cluster(snap, w, h), w)
        assert_fits(text, w, h)
    text, _ = text_of(render_worker(worker(), w, h), w)
    assert_fits(text, w, h)


def test_wide_terminal_puts_sample_beside_tables() -> None:
    text, c = text_of(render_cluster(cluster(), 160, 30), 160)
    assert_fits(text, 160, 30)
    alice = next(line for line in text.splitlines() if "alice" in line)
    assert "▀" in alice


def test_sample_pixels_are_truecolor_half_blocks() -> None:
    _, c = text_of(render_cluster(cluster(workers=WORKERS[:2]), 100, 60), 100)
    styled = c.export_text(styles=True)
    assert re.search(r"\x1b\[38;2;\d+;\d+;\d+;48;2;\d+;\d+;\d+m▀", styled)


def test_watch_leaderboard_ranks() -> None:
    text, _ = text_of(render_cluster(cluster(title="watch", leaderboard=True, sample=None), 100, 30), 100)
    assert "ganns-async watch" in text
    lines = text.splitlines()
    row = {name: next(line for line in lines if f" {name} " in line) for name in ("alice", "carol", "erin", "bob")}
    assert "🥇" in row["alice"]
    assert "🥈" in row["carol"]
    assert "🥉" in row["erin"]  # offline still counts: it contributed
    assert "4." in row["bob"]


# --------------------------------------------------------------------------- worker view


def test_worker_view() -> None:
    text, _ = text_of(render_worker(worker(), 100, 24), 100)
    assert_fits(text, 100, 24)
    assert "connected" in text
    assert "#42" in text and "step 12" in text and "63%" in text
    assert "#2 of 7" in text
    assert "21.0 img/s on cuda:0" in text
    assert "12 units" in text and "3,072 images" in text
    assert "D loss" in text and "G loss" in text
    assert TICKS & set(text)
    assert "uploading unit 41 took 0.4 s" in text


def test_worker_view_80x24_and_idle() -> None:
    snap = worker(
        connection="reconnecting",
        state="waiting",
        run_id=None,
        unit_id=None,
        unit_step=None,
        unit_progress=None,
        rank=None,
        workers_total=None,
        recent_losses=(),
        message="database unreachable, retrying in 4s",
    )
    text, _ = text_of(render_worker(snap, 80, 24), 80)
    assert_fits(text, 80, 24)
    assert "reconnecting" in text
    assert "waiting for a run" in text
    assert "no units finished yet" in text
    assert "retrying in 4s" in text
    text, _ = text_of(render_worker(worker(), 80, 24), 80)
    assert_fits(text, 80, 24)
    assert "#2 of 7" in text and "63%" in text


def test_renders_do_not_read_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("a view read the clock")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, no_clock)
    for w, h in ((100, 30), (80, 24), (160, 40)):
        c = console(w)
        c.print(render_cluster(cluster(), w, h))
        c.print(render_cluster(cluster(leaderboard=True, max_steps=None), w, h))
        c.print(render_worker(worker(), w, h))
        c.print(render_worker(worker(unit_progress=None), w, h))


def test_same_snapshot_same_picture() -> None:
    a, ca = text_of(render_cluster(cluster(), 100, 30), 100)
    b, cb = text_of(render_cluster(cluster(), 100, 30), 100)
    assert ca.export_text(styles=True) == cb.export_text(styles=True)


# --------------------------------------------------------------------------- pieces


def test_sparkline_edges() -> None:
    assert sparkline([], 10) == ""
    assert sparkline([1.0, 2.0], 0) == ""
    assert sparkline([3.0, 3.0, 3.0], 10) == "▄▄▄"
    assert sparkline([None, float("nan"), float("inf")], 5) == "   "
    assert sparkline([0.0, None, 1.0, float("nan")], 10) == "▁ █ "
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    long = list(range(100))
    line = sparkline(long, 20)
    assert len(line) == 20
    assert line == sparkline(long[-20:], 20)  # the latest values, scaled among themselves
    assert line[0] == "▁" and line[-1] == "█"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "—"),
        (float("nan"), "—"),
        (-4, "0s"),
        (0, "0s"),
        (3.9, "3s"),
        (59, "59s"),
        (60, "1m00s"),
        (125, "2m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3720, "1h02m"),
        (90_000, "1d01h"),
    ],
)
def test_format_duration(seconds: float | None, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize(
    ("shape", "max_w", "max_h", "expected_cols", "expected_rows"),
    [
        ((64, 64), 40, 10, 20, 10),  # height-bound: 20 px tall, square
        ((64, 64), 16, 30, 16, 8),  # width-bound
        ((64, 64), 100, 100, 64, 32),  # never enlarged
        ((32, 128), 64, 20, 64, 8),  # wide image keeps 4:1
        ((63, 20), 100, 100, 20, 32),  # odd pixel rows: the last cell has only a top pixel
    ],
)
def test_half_block_image_fits(
    shape: tuple[int, int], max_w: int, max_h: int, expected_cols: int, expected_rows: int
) -> None:
    h, w = shape
    image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    text = half_block_image(image, max_w, max_h)
    rows = text.plain.split("\n")
    assert len(rows) == expected_rows <= max_h
    assert {len(r) for r in rows} == {expected_cols}
    assert set(text.plain) <= {"▀", "\n"}


def test_half_block_image_colours() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0] = (255, 0, 0)
    image[1] = (0, 0, 255)
    c = console(10)
    c.print(half_block_image(image, 10, 10))
    assert "\x1b[38;2;255;0;0;48;2;0;0;255m▀▀" in c.export_text(styles=True)
    with pytest.raises(ValueError):
        half_block_image(np.zeros((4, 4, 2), dtype=np.uint8), 10, 10)


def test_snapshots_are_frozen_and_comparable() -> None:
    snap = cluster()
    with pytest.raises(AttributeError):
        snap.step = 13  # type: ignore[misc]
    assert snap == cluster(sample=gradient(8))  # pixels are not part of equality
