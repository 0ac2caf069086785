"""A training-metrics chart drawn with Pillow alone (no matplotlib).

``write_metrics_plot(rows, path)`` renders three stacked panels -- losses, discriminator
outputs and sliced Wasserstein distance -- from per-step metric dicts and atomically
replaces ``path`` with the PNG.  The same rows always give the same bytes.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH = 1200
HEIGHT = 900

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
AXIS = (60, 60, 60)
GRID = (225, 225, 225)
MUTED = (130, 130, 130)

# Tableau-like colours, distinct from each other and from the greys above.
G_LOSS_COLOR = (31, 119, 180)
D_LOSS_COLOR = (255, 127, 14)
D_X_COLOR = (44, 160, 44)
D_G_Z_COLOR = (214, 39, 40)
SWD_COLOR = (148, 103, 189)

MARGIN_LEFT = 78
MARGIN_RIGHT = 24
HEADER_H = 36  # panel title + legend row
FOOTER_H = 26  # x tick labels
PANEL_GAP = 10

Row = Mapping[str, "float | int | None"]
Point = tuple[float, float]


@dataclass(frozen=True)
class _Series:
    key: str
    label: str
    color: tuple[int, int, int]
    scale: float = 1.0


@dataclass(frozen=True)
class _Panel:
    title: str
    series: tuple[_Series, ...]
    fixed_y: tuple[float, float] | None = None
    markers: bool = False
    empty_text: str = "no values yet"


PANELS: tuple[_Panel, ...] = (
    _Panel("Losses", (_Series("g_loss", "G loss", G_LOSS_COLOR),
                      _Series("d_loss", "D loss", D_LOSS_COLOR))),
    _Panel("D outputs", (_Series("d_x", "D(x)", D_X_COLOR),
                         _Series("d_g_z", "D(G(z))", D_G_Z_COLOR)),
           fixed_y=(0.0, 1.0)),
    _Panel("SWD (x1e3)", (_Series("swd", "SWD x1e3", SWD_COLOR, scale=1.0),),
           markers=True, empty_text="not recorded yet"),
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ValueError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def _num(value: object) -> float | None:
    """A finite float, or None for missing / None / NaN / inf / non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10.0 * mag


def _nice_range(lo: float, hi: float, target: int, *, integer: bool = False
                ) -> tuple[float, float, list[float], float]:
    """Expand [lo, hi] to tick-aligned bounds; returns (lo, hi, ticks, step)."""
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):  # constant series: no zero-range axis
        if integer:
            pad = 1.0
        else:
            pad = abs(lo) * 0.1 if lo != 0 else 0.5
        nonneg = lo >= 0
        lo, hi = lo - pad, hi + pad
        if nonneg and lo < 0:  # keep non-negative data (steps, losses, SWD) off negative axes
            lo, hi = 0.0, hi - lo
    step = _nice_step(hi - lo, target)
    if integer:
        step = max(1.0, float(round(step)))
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    n = int(round((stop - start) / step))
    ticks = [round(start + i * step, 12) for i in range(n + 1)]
    return start, stop, ticks, step


def _fmt(value: float, step: float) -> str:
    if step >= 1 and abs(value) < 1e7:
        text = f"{value:.0f}"
    elif abs(value) >= 1e7 or (step < 1e-4 and value != 0):
        text = f"{value:.3g}"
    else:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if step * 10 ** decimals % 1 > 1e-6:  # e.g. 0.25 needs one more digit
            decimals += 1
        text = f"{value:.{decimals}f}"
    if text.lstrip("-").strip("0.") == "":
        text = text.lstrip("-")  # no "-0.0"
    return text


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font,  # type: ignore[no-untyped-def]
               fill: tuple[int, int, int], anchor: str) -> None:
    """Text placed by anchor ("lm", "rm", "mt", "mm", ...)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(xy, text, font=font, fill=fill, anchor=anchor)
        return
    # Bitmap fonts ignore (or reject) anchors: place the text by its bounding box.
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = xy[0] - left - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y = xy[1] - top - {"t": 0, "a": 0, "m": h / 2, "b": h, "s": h, "d": h}[anchor[1]]
    draw.text((round(x), round(y)), text, font=font, fill=fill)


def _series_points(rows: Sequence[tuple[int, Row]], series: _Series) -> list[Point]:
    pts: list[Point] = []
    for step, row in rows:
        v = _num(row.get(series.key))
        if v is not None:
            scaled = v * series.scale
            if math.isfinite(scaled):
                pts.append((float(step), scaled))
    return pts


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: _Panel,
                rows: Sequence[tuple[int, Row]], x_range: tuple[float, float] | None,
                font, title_font) -> None:  # type: ignore[no-untyped-def]
    left, top, right, bottom = box
    # Header: title on the left, legend on the right.
    header_mid = top + 12
    _draw_text(draw, (left, header_mid), panel.title, title_font, BLACK, "lm")
    lx = right
    for series in reversed(panel.series):
        w, _ = _text_size(draw, series.label, font)
        lx -= w
        _draw_text(draw, (lx, header_mid), series.label, font, BLACK, "lm")
        lx -= 30
        draw.line([(lx, header_mid), (lx + 22, header_mid)], fill=series.color, width=3)
        if panel.markers:
            draw.ellipse([lx + 8, header_mid - 3, lx + 14, header_mid + 3], fill=series.color)
        lx -= 18

    px0, py0 = left + MARGIN_LEFT, top + HEADER_H
    px1, py1 = right, bottom - FOOTER_H
    plot_w, plot_h = max(px1 - px0, 1), max(py1 - py0, 1)

    data = [(s, _series_points(rows, s)) for s in panel.series]
    values = [y for _, pts in data for _, y in pts]

    def frame() -> None:
        draw.rectangle([px0, py0, px1, py1], outline=AXIS, width=1)

    if x_range is None or not values:
        # Empty body: a bare frame with a note.
        frame()
        note = "no steps yet" if x_range is None else panel.empty_text
        _draw_text(draw, ((px0 + px1) / 2, (py0 + py1) / 2), note, font, MUTED, "mm")
        return

    x_lo, x_hi, x_ticks, x_step = _nice_range(x_range[0], x_range[1], 8, integer=True)
    if panel.fixed_y is not None:
        y_lo, y_hi = panel.fixed_y
        y_step = _nice_step(y_hi - y_lo, 4)
        n = int(round((y_hi - y_lo) / y_step))
        y_ticks = [round(y_lo + i * y_step, 12) for i in range(n + 1)]
    else:
        y_lo, y_hi, y_ticks, y_step = _nice_range(min(values), max(values), 4)

    def sx(x: float) -> float:
        return px0 + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        y = min(max(y, y_lo), y_hi)
        return py1 - (y - y_lo) / (y_hi - y_lo) * plot_h

    # Grid + ticks.
    for t in y_ticks:
        yy = round(sy(t))
        if py0 < yy < py1:
            draw.line([(px0, yy), (px1, yy)], fill=GRID, width=1)
        draw.line([(px0 - 5, yy), (px0, yy)], fill=AXIS, width=1)
        _draw_text(draw, (px0 - 8, yy), _fmt(t, y_step), font, AXIS, "rm")
    for t in x_ticks:
        xx = round(sx(t))
        if px0 < xx < px1:
            draw.line([(xx, py0), (xx, py1)], fill=GRID, width=1)
        draw.line([(xx, py1), (xx, py1 + 5)], fill=AXIS, width=1)
        _draw_text(draw, (xx, py1 + 7), _fmt(t, x_step), font, AXIS, "mt")
    _draw_text(draw, (px0 - 16, py1 + 7), "step", font, MUTED, "rt")
    frame()

    # Series.
    for series, pts in data:
        xy = [(round(sx(x), 2), round(sy(y), 2)) for x, y in pts]
        if len(xy) >= 2:
            draw.line(xy, fill=series.color, width=2, joint="curve")
        if panel.markers or len(xy) == 1:
            r = 3
            for x, y in xy:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=series.color)


def _render(rows: Sequence[Row], title: str) -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), WHITE)
    draw = ImageDraw.Draw(img)
    font = _font(13)
    title_font = _font(15)

    ordered: list[tuple[int, Row]] = []
    for row in rows:
        step = _num(row.get("step"))
        if step is not None:
            ordered.append((int(step), row))
    ordered.sort(key=lambda pair: pair[0])  # stable: equal steps keep input order
    x_range = (float(ordered[0][0]), float(ordered[-1][0])) if ordered else None

    top = 8
    if title:
        big = _font(18)
        _draw_text(draw, (WIDTH / 2, 20), title, big, BLACK, "mm")
        top = 40
    left, right = 14, WIDTH - MARGIN_RIGHT
    panel_h = (HEIGHT - top - 8 - PANEL_GAP * (len(PANELS) - 1)) // len(PANELS)
    for i, panel in enumerate(PANELS):
        y0 = top + i * (panel_h + PANEL_GAP)
        _draw_panel(draw, (left, y0, right, y0 + panel_h), panel, ordered, x_range, font, title_font)
    return img


def write_metrics_plot(rows: Sequence[Mapping[str, float | int | None]], path: Path, *,
                       title: str = "") -> Path:
    """Draw losses, D outputs and SWD against step into a PNG at ``path`` (atomically).

    ``rows`` are per-step dicts with ``step`` and optional ``g_loss``, ``d_loss``, ``d_x``,
    ``d_g_z`` and ``swd`` (already x1e3, as :mod:`ganns_async.quality` reports it); None, missing, NaN and inf values are skipped.  Returns ``path``.
    """
    path = Path(path)
    img = _render(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="PNG")
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path
