"""The metrics chart: a legible, deterministic PNG for 0, 1 and many steps, from any thread."""

from __future__ import annotations

import logging
import math
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ganns_async.plots import (
    D_G_Z_COLOR,
    D_LOSS_COLOR,
    D_X_COLOR,
    G_LOSS_COLOR,
    HEIGHT,
    SWD_COLOR,
    WIDTH,
    write_metrics_plot,
)

ALL_COLORS = (G_LOSS_COLOR, D_LOSS_COLOR, D_X_COLOR, D_G_Z_COLOR, SWD_COLOR)


@pytest.fixture(scope="module", autouse=True)
def _font_cache() -> None:
    """matplotlib lists the system fonts with ``fc-list`` (a subprocess) the first time it
    runs with an empty cache folder, and tests/conftest.py gives every session a fresh one.
    That one-off setup is matplotlib's, not the chart's: do it before the unit tier's
    no-subprocess guard (a function fixture) is in place."""
    import matplotlib.font_manager  # noqa: F401 - builds the font cache on import


def _rows(n: int) -> list[dict[str, float | int | None]]:
    rows: list[dict[str, float | int | None]] = []
    for step in range(n):
        t = step / max(n - 1, 1)
        row: dict[str, float | int | None] = {
            "step": step,
            "g_loss": 4.0 * math.exp(-3 * t) + 0.8 + 0.3 * math.sin(step / 3),
            "d_loss": 1.4 - 0.6 * t + 0.1 * math.cos(step / 5),
            "d_x": 0.5 + 0.3 * t,
            "d_g_z": 0.5 - 0.3 * t,
            "swd": 90 * math.exp(-2 * t) + 10 if step % 10 == 0 else None,
        }
        rows.append(row)
    if n >= 200:
        rows[17]["g_loss"] = None
        rows[33]["d_loss"] = float("nan")
        rows[50]["d_x"] = float("inf")
        del rows[71]["d_g_z"]
        rows[40]["swd"] = None
    return rows


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == (WIDTH, HEIGHT)
        return img.convert("RGB")


def _near(img: Image.Image, color: tuple[int, int, int], box: tuple[int, int, int, int] | None = None,
          tol: int = 12) -> list[tuple[int, int]]:
    """Pixels (x, y) within ``tol`` of ``color`` on every channel (lines are antialiased)."""
    x0, y0, x1, y1 = box or (0, 0, WIDTH, HEIGHT)
    px = np.asarray(img, dtype=np.int16)[y0:y1, x0:x1]
    ys, xs = np.nonzero((np.abs(px - np.array(color, dtype=np.int16)) <= tol).all(axis=2))
    return [(int(x) + x0, int(y) + y0) for x, y in zip(xs, ys)]


def _chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kinds.append(data[pos + 4:pos + 8])
        pos += 12 + length
    return kinds


@pytest.mark.parametrize("n", [0, 1, 200])
def test_plot_is_a_png_of_expected_size_with_every_legend(tmp_path: Path, n: int) -> None:
    out = tmp_path / "sub" / "metrics.png"
    assert write_metrics_plot(_rows(n), out, title=f"{n} steps") == out
    img = _rgb(out)
    assert len(img.getcolors(maxcolors=WIDTH * HEIGHT)) >= 5
    # The legends are always drawn, so every series colour is there even with no data.
    for c in ALL_COLORS:
        assert len(_near(img, c, tol=4)) >= 10, c
    assert not [p for p in out.parent.iterdir() if p.name != "metrics.png"]  # no temp file left


def test_curves_are_drawn_for_many_rows(tmp_path: Path) -> None:
    full = _rgb(write_metrics_plot(_rows(200), tmp_path / "a.png"))
    empty = _rgb(write_metrics_plot([], tmp_path / "b.png"))
    # A curve adds far more of its colour than the legend swatch alone.
    for c in ALL_COLORS:
        assert len(_near(full, c)) > len(_near(empty, c)) + 200, c


def test_the_picture_follows_the_data(tmp_path: Path) -> None:
    rising = [{"step": s, "g_loss": 1.0 + s / 25} for s in range(101)]
    falling = [{"step": s, "g_loss": 5.0 - s / 25} for s in range(101)]
    a = write_metrics_plot(rising, tmp_path / "rising.png")
    b = write_metrics_plot(falling, tmp_path / "falling.png")
    assert a.read_bytes() != b.read_bytes()

    def mean_y(img: Image.Image, x0: int, x1: int) -> float:
        # The losses panel, below its title row and legend.
        pts = _near(img, G_LOSS_COLOR, (x0, 70, x1, HEIGHT // 3))
        assert len(pts) > 20
        return sum(y for _, y in pts) / len(pts)

    up, down = _rgb(a), _rgb(b)
    # Rising: the right end of the curve sits higher (smaller y) than its left end.
    assert mean_y(up, 800, 1100) < mean_y(up, 120, 400) - 100
    assert mean_y(down, 800, 1100) > mean_y(down, 120, 400) + 100
    # Another series gives another picture, in that series' colour.
    other = _rgb(write_metrics_plot([{"step": s, "d_loss": 1.0 + s / 25} for s in range(101)],
                                    tmp_path / "d.png"))
    assert len(_near(other, D_LOSS_COLOR)) > len(_near(up, D_LOSS_COLOR)) + 200
    assert len(_near(other, G_LOSS_COLOR)) < len(_near(up, G_LOSS_COLOR)) - 200


def test_same_input_same_bytes_and_no_stamps(tmp_path: Path) -> None:
    rows = _rows(200)
    a = write_metrics_plot(rows, tmp_path / "a.png", title="run")
    b = write_metrics_plot(rows, tmp_path / "b.png", title="run")
    assert a.read_bytes() == b.read_bytes()
    # Overwriting in place works and is stable too.
    write_metrics_plot(rows, a, title="run")
    assert a.read_bytes() == b.read_bytes()
    # No time or software version that would change the bytes between runs or releases.
    kinds = _chunks(a.read_bytes())
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert not {b"tIME", b"tEXt", b"iTXt", b"zTXt"} & set(kinds), kinds
    # The title is part of the picture.
    c = write_metrics_plot(rows, tmp_path / "c.png", title="another run")
    assert c.read_bytes() != a.read_bytes()


EDGE_CASES: dict[str, list[dict[str, object]]] = {
    "no rows": [],
    "rows without steps": [{"g_loss": 1.0}, {"step": None, "d_loss": 2.0}, {"step": float("nan")}],
    "one point": [{"step": 0, "g_loss": 1.0, "d_loss": 0.7, "d_x": 0.5, "d_g_z": 0.4, "swd": 50.0}],
    "one swd point": [{"step": 0, "swd": 0.05}],
    "flat series": [{"step": s, "g_loss": 1.0, "d_loss": 0.0} for s in range(5)] + [{"step": 5}],
    "nan and inf": [{"step": s, "g_loss": v, "d_loss": -v, "d_x": v, "d_g_z": v, "swd": v}
                    for s, v in enumerate([float("nan"), float("inf"), float("-inf"), 1.0, float("nan")])],
    "all nan": [{"step": s, "g_loss": float("nan"), "swd": float("inf")} for s in range(10)],
    "no swd yet": [{"step": s, "g_loss": 2.0 - s / 100, "d_loss": 1.0} for s in range(100)],
    "junk values": [{"step": 1, "g_loss": "x", "d_loss": True, "d_x": [1], "swd": 10**400}],
    "huge steps": [{"step": 10**15 + s, "g_loss": 1.0 + s, "swd": 3.0} for s in range(3)],
    "enormous steps": [{"step": 10**300, "g_loss": 1.0}, {"step": 10**301, "g_loss": 2.0}],
    "unsorted, duplicated": [{"step": s % 7, "g_loss": float(s)} for s in range(20)],
    "many rows": [{"step": s * 1000, "g_loss": 1.0 + math.sin(s / 50), "d_loss": 1.0,
                   "swd": 20.0 if s % 500 == 0 else None} for s in range(20_000)],
}


@pytest.mark.filterwarnings("error")  # no RuntimeWarning / UserWarning from matplotlib either
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_odd_data_draws_without_raising(tmp_path: Path, case: str) -> None:
    out = write_metrics_plot(EDGE_CASES[case], tmp_path / "m.png", title=r"$\nope{ odd$ title 50%")  # type: ignore[arg-type]
    _rgb(out)  # decodes, at the usual size


def test_one_point_is_visible(tmp_path: Path) -> None:
    """A single value has no line to draw: it shows as a marker, not as nothing."""
    one = _rgb(write_metrics_plot([{"step": 0, "g_loss": 1.0}], tmp_path / "one.png"))
    none = _rgb(write_metrics_plot([{"step": 0}], tmp_path / "none.png"))
    assert len(_near(one, G_LOSS_COLOR)) > len(_near(none, G_LOSS_COLOR)) + 10


def test_two_threads_draw_at_once(tmp_path: Path) -> None:
    """The coordinator draws on its train thread; two draws at once give the same bytes as one."""
    inputs = {"a": _rows(200), "b": EDGE_CASES["no swd yet"]}
    expected = {k: write_metrics_plot(v, tmp_path / f"ref_{k}.png", title=k).read_bytes()
                for k, v in inputs.items()}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def draw(key: str) -> None:
        try:
            start.wait()
            for i in range(3):
                got = write_metrics_plot(inputs[key], tmp_path / f"{key}_{i}.png", title=key)
                assert got.read_bytes() == expected[key]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=draw, args=(k,)) for k in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_matplotlib_notices_stay_out_of_the_log(tmp_path: Path) -> None:
    """Font-cache and config-folder notices are WARNINGs on the "matplotlib" logger: muted."""
    logger = logging.getLogger("matplotlib")
    saved = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        write_metrics_plot(_rows(3), tmp_path / "m.png")
        assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.WARNING)
        # A level someone chose on purpose stays.
        logger.setLevel(logging.DEBUG)
        write_metrics_plot(_rows(3), tmp_path / "m.png")
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(saved)
