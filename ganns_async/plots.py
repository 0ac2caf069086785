"""The training-curves chart, ``metrics.png``, drawn with matplotlib.

``write_metrics_plot(rows, path)`` draws three panels over one shared step axis -- losses,
discriminator outputs and sliced Wasserstein distance -- from per-step metric dicts and
atomically replaces ``path`` with the PNG.  The same rows always give the same bytes.

The coordinator draws from its train thread, so this module never touches ``pyplot`` (its
global figure manager is not thread-safe and would go looking for a GUI backend): each call
builds its own :class:`~matplotlib.figure.Figure` and renders it with the Agg canvas.
matplotlib is imported on first use, so importing this module (and starting a worker) stays
cheap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

WIDTH = 1200  # pixels: FIGSIZE at DPI
HEIGHT = 900
DPI = 100

# Tableau hues; the dashboard uses the same ones, so the projector and the PNG agree.
G_LOSS_COLOR = (31, 119, 180)
D_LOSS_COLOR = (255, 127, 14)
D_X_COLOR = (44, 160, 44)
D_G_Z_COLOR = (214, 39, 40)
SWD_COLOR = (148, 103, 189)
MUTED = (130, 130, 130)

Row = Mapping[str, "float | int | None"]



class _Panel(NamedTuple):
    title: str
    ylabel: str
    series: tuple[tuple[str, str, tuple[int, int, int]], ...]  # (row key, legend label, colour)
    fixed_y: tuple[float, float] | None = None  # D outputs are probabilities: always 0..1
    markers: bool = False  # SWD is measured every --eval-every steps: show each measurement
    empty_note: str = "no values yet"


PANELS: tuple[_Panel, ...] = (
    _Panel("Losses", "loss", (("g_loss", "G loss", G_LOSS_COLOR), ("d_loss", "D loss", D_LOSS_COLOR))),
    _Panel("D outputs", "mean output", (("d_x", "D(x)", D_X_COLOR), ("d_g_z", "D(G(z))", D_G_Z_COLOR)),
           fixed_y=(-0.02, 1.02)),
    _Panel("Sliced Wasserstein distance", "SWD x1e3 (lower is better)", (("swd", "SWD x1e3", SWD_COLOR),),
           markers=True, empty_note="not recorded yet"),
)


def _num(value: object) -> float | None:
    """A finite float, or None for missing / None / NaN / inf / non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _step_text(step: float) -> str:
    return f"{step:,.0f}" if abs(step) < 1e15 else f"{step:.4g}"


def _rgb(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _quiet_matplotlib() -> None:
    """Keep matplotlib's one-off notices out of the coordinator's log and the dashboard.

    On first use matplotlib says it is building its font cache, and with an unwritable
    ``MPLCONFIGDIR`` that it fell back to a temporary folder; both go through ``logging`` at
    WARNING and would land in whatever handler the CLI set up.  Neither needs action from
    the person watching a run.  A level someone set on purpose is left alone.
    """
    logger = logging.getLogger("matplotlib")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def _figure(rows: Sequence[Row], title: str) -> Any:
    _quiet_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ordered = sorted(((s, r) for r in rows if (s := _num(r.get("step"))) is not None),
                     key=lambda pair: pair[0])  # stable: equal steps keep input order

    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    facts = [title] if title else []
    if ordered:
        facts.append(f"step {_step_text(ordered[-1][0])}")
    for ax, panel in zip(axes, PANELS):
        ax.set_title(panel.title, loc="left", fontsize=12, fontweight="bold")
        ax.set_ylabel(panel.ylabel, fontsize=10)
        ax.grid(True, color="#e6e6e6", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=9)
        drawn = False
        for key, label, color in panel.series:
            pts = [(s, v) for s, r in ordered if (v := _num(r.get(key))) is not None]
            if key == "swd" and pts:
                best = min(pts, key=lambda p: p[1])
                facts.append(f"best SWD {best[1]:.3g} at step {_step_text(best[0])}")
            # One point has no line to draw: a marker shows it.
            marker = "o" if panel.markers or len(pts) == 1 else None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_rgb(color), label=label,
                    linewidth=1.6, marker=marker, markersize=4)
            drawn = drawn or bool(pts)
        if panel.fixed_y is not None:
            ax.set_ylim(*panel.fixed_y)
        if not drawn:
            note = "no steps yet" if not ordered else panel.empty_note
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center",
                    color=_rgb(MUTED), fontsize=11, parse_math=False)
            ax.tick_params(labelleft=False)  # the 0..1 of an empty axis means nothing
        # On the title row, right-aligned: a legend there never hides a curve.
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2, fontsize=9,
                  frameon=False, ncols=len(panel.series))
    bottom = axes[-1]
    bottom.set_xlabel("step", fontsize=10)
    bottom.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    formatter = ScalarFormatter(useOffset=True, useMathText=False)
    formatter.set_powerlimits((-4, 9))  # plain integers up to a billion steps
    bottom.xaxis.set_major_formatter(formatter)
    if not ordered:
        bottom.tick_params(labelbottom=False)
    if facts:
        # parse_math off: a "$" in a title is text, not an unbalanced TeX formula that raises.
        fig.suptitle("  ·  ".join(facts), fontsize=14, parse_math=False)
    return fig


def write_metrics_plot(rows: Sequence[Mapping[str, float | int | None]], path: Path, *,
                       title: str = "") -> Path:
    """Draw losses, D outputs and SWD against step into a PNG at ``path`` (atomically).

    ``rows`` are per-step dicts with ``step`` and optional ``g_loss``, ``d_loss``, ``d_x``,
    ``d_g_z`` and ``swd`` (already x1e3, as :mod:`ganns_async.quality` reports it); None,
    missing, NaN and inf values are skipped, and a series connects the steps it has.  The
    title line carries ``title``, the last step and the best SWD so far.  The image is
    ``WIDTH`` x ``HEIGHT`` pixels, without a timestamp or version stamp, so the same rows give
    the same bytes.  Safe to call from several threads at once.  Returns ``path``.
    """
    path = Path(path)
    fig = _figure(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Readers (the Hub upload, a browser refreshing) never see half a file.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI, metadata={"Software": None})
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path
