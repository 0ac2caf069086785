"""The metrics chart: a legible, deterministic PNG for 0, 1 and many steps."""

from __future__ import annotations

import math
from pathlib import Path

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
            "swd": 0.09 * math.exp(-2 * t) + 0.01 if step % 10 == 0 else None,
        }
        rows.append(row)
    if n >= 200:
        rows[17]["g_loss"] = None
        rows[33]["d_loss"] = float("nan")
        rows[50]["d_x"] = float("inf")
        del rows[71]["d_g_z"]
        rows[40]["swd"] = None
    return rows


def _colors(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == (WIDTH, HEIGHT)
        rgb = img.convert("RGB")
    return {c for _, c in rgb.getcolors(maxcolors=WIDTH * HEIGHT)}


@pytest.mark.parametrize("n", [0, 1, 200])
def test_plot_is_a_nonblank_png_of_expected_size(tmp_path: Path, n: int) -> None:
    out = tmp_path / "sub" / "metrics.png"
    assert write_metrics_plot(_rows(n), out, title=f"{n} steps") == out
    colors = _colors(out)
    assert len(colors) >= 5
    # Legend swatches are always drawn, so every series colour is present.
    for c in (G_LOSS_COLOR, D_LOSS_COLOR, D_X_COLOR, D_G_Z_COLOR, SWD_COLOR):
        assert c in colors
    assert not [p for p in out.parent.iterdir() if p.name != "metrics.png"]  # no temp left


def test_lines_are_drawn_for_many_rows(tmp_path: Path) -> None:
    with_data = write_metrics_plot(_rows(200), tmp_path / "a.png")
    empty = write_metrics_plot([], tmp_path / "b.png")
    with Image.open(with_data) as a, Image.open(empty) as b:
        ca = dict((c, k) for k, c in a.convert("RGB").getcolors(WIDTH * HEIGHT))
        cb = dict((c, k) for k, c in b.convert("RGB").getcolors(WIDTH * HEIGHT))
    # The G-loss curve adds far more of its colour than the legend swatch alone.
    assert ca[G_LOSS_COLOR] > cb[G_LOSS_COLOR] + 200
    assert ca[SWD_COLOR] > cb[SWD_COLOR] + 50


def test_same_input_same_bytes(tmp_path: Path) -> None:
    rows = _rows(200)
    a = write_metrics_plot(rows, tmp_path / "a.png", title="run")
    b = write_metrics_plot(rows, tmp_path / "b.png", title="run")
    assert a.read_bytes() == b.read_bytes()
    # Overwriting in place works and is stable too.
    write_metrics_plot(rows, a, title="run")
    assert a.read_bytes() == b.read_bytes()


def test_degenerate_series(tmp_path: Path) -> None:
    rows = [{"step": s, "g_loss": 1.0, "d_loss": 0.0, "d_x": None, "d_g_z": float("nan")}
            for s in range(5)]
    rows.append({"step": 5})
    out = write_metrics_plot(rows, tmp_path / "flat.png")
    assert G_LOSS_COLOR in _colors(out)
    one = write_metrics_plot([{"step": 0, "swd": 0.05}], tmp_path / "one.png")
    assert SWD_COLOR in _colors(one)
