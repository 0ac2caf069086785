"""Terminal dashboards for the coordinator, the projector (``watch``) and each worker.

The views are pure functions of frozen snapshot dataclasses: the coordinator and worker
loops gather what they know into a ``ClusterSnapshot`` or ``WorkerSnapshot`` and hand it to
``render_cluster`` / ``render_worker`` inside one thin ``Live(auto_refresh=False)`` loop.
Nothing here reads the clock, the database or the terminal size, so the same snapshot always
draws the same picture and tests can render it to a recording ``Console``.

Everything is built from ``Text``, ``Table`` and ``Panel`` with explicit heights and no
wrapping, so a view asked to fit ``width`` x ``height`` never spills: the layout spends the
height budget in a fixed order of sacrifice (the sample picture first, then the event log,
then the training history, and the workers table last, ending in "+N more").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from rich.align import Align
from rich.color import Color
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.constrain import Constrain
from rich.measure import Measurement
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from ganns_async.states import QUARANTINED, STALE, WorkerState

__all__ = [
    "ClassResources",
    "ClusterSnapshot",
    "EventLine",
    "GpuModel",
    "StepPoint",
    "WorkerRow",
    "WorkerSnapshot",
    "format_duration",
    "half_block_image",
    "render_cluster",
    "render_worker",
    "resources_line",
    "sparkline",
]


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class WorkerRow:
    """One student's machine as the coordinator sees it, for one row of the workers table."""

    name: str
    device: str  # e.g. "cpu", "cuda", "cuda:0"
    state: str  # a WorkerState, or the labels STALE / QUARANTINED (ganns_async/states.py)
    units_done: int
    images_done: int
    images_per_s: float  # recent rate, 0 if unknown
    share: float  # fraction 0..1 of all images of the run
    last_seen_s: float  # seconds since its last heartbeat


@dataclass(frozen=True)
class StepPoint:
    """Metrics of one optimizer step; any of them may be missing (SWD is measured rarely)."""

    step: int
    g_loss: float | None = None
    d_loss: float | None = None
    d_x: float | None = None
    d_g_z: float | None = None
    swd: float | None = None


@dataclass(frozen=True)
class EventLine:
    """One line of the event log, already phrased for people."""

    age_s: float  # seconds ago
    kind: str  # "join", "leave", "requeue", "rejected", "step", "run", "quality", "stale", "coordinator", ...
    message: str


@dataclass(frozen=True)
class GpuModel:
    """GPUs of one kind in the class: "2x RTX 3060 12 GiB"."""

    name: str | None  # as the driver names it; None when a worker did not say
    memory_gib: int | None  # per GPU, in whole GiB; None when unknown
    count: int


@dataclass(frozen=True)
class ClassResources:
    """What the workers online bring, as totals (``ganns_view.class_resources``): viewers
    never see one worker's hardware, only these sums."""

    workers: int  # online: not offline, heard from within the last 30 s
    unreported: int  # of them, workers that did not tell their hardware (older releases)
    cpu_cores: int
    gpus: int
    gpu_memory_bytes: int
    gpu_models: tuple[GpuModel, ...] = ()  # most common first; may list fewer GPUs than ``gpus``


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything the coordinator and watch views show, captured at one instant.

    ``sample`` is excluded from equality and hashing because numpy arrays have neither in
    the sense a dataclass needs; two snapshots that differ only in pixels compare equal.
    """

    title: str  # "coordinator" or "watch"
    run_id: int | None
    status: str  # "running", "paused", "done", "stopped", "waiting for a run"
    step: int
    max_steps: int | None
    epoch: int
    epoch_fraction: float  # 0..1 progress through the current epoch
    images_per_s: float  # cluster rate over recent steps
    effective_batch: int  # images per step: units x unit size (x local steps)
    since_last_step_s: float | None
    eta_s: float | None  # None when unknown/unbounded
    db_ok: bool
    db_latency_ms: float | None
    workers: tuple[WorkerRow, ...]
    history: tuple[StepPoint, ...]  # recent steps, oldest first
    events: tuple[EventLine, ...]  # newest first
    sample: np.ndarray | None = field(default=None, compare=False)  # H x W x 3 uint8
    leaderboard: bool = False  # watch view: show a contributions leaderboard
    resources: ClassResources | None = None  # the class's hardware; None: not read (no line)


@dataclass(frozen=True)
class WorkerSnapshot:
    """What a student's own terminal shows about its worker process."""

    name: str
    device: str
    connection: str  # "connecting", "connected", "reconnecting"
    run_id: int | None
    state: str  # a WorkerState
    unit_id: int | None
    unit_step: int | None
    unit_progress: float | None  # 0..1 of the current unit, None when idle
    units_done: int
    images_done: int
    images_per_s: float
    rank: int | None  # 1 = most images in the run
    workers_total: int | None
    recent_losses: tuple[tuple[float, float], ...]  # (d_loss, g_loss) of recent units, oldest first
    message: str = ""


# --------------------------------------------------------------------------- small pieces

_TICKS = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉"
_DASH = "—"

# The same hues as the PNG chart in plots.py, so the projector and the report agree.
_SERIES_COLORS = {
    "g_loss": "rgb(31,119,180)",
    "d_loss": "rgb(255,127,14)",
    "d_x": "rgb(44,160,44)",
    "d_g_z": "rgb(214,39,40)",
    "swd": "rgb(148,103,189)",
}

_WORKER_STATE_STYLES = {
    WorkerState.COMPUTING: "green",
    WorkerState.UPLOADING: "cyan",
    WorkerState.IDLE: "white",
    WorkerState.OFFLINE: "grey50",
    WorkerState.WAITING: "grey50",
    WorkerState.PAUSED: "yellow",
    STALE: "yellow",
    QUARANTINED: "bold red",
}

_RUN_STATUS_STYLES = {
    "running": "bold green",
    "paused": "bold yellow",
    "done": "bold cyan",
    "stopped": "bold red",
}

_CONNECTION_STYLES = {
    "connected": "green",
    "connecting": "yellow",
    "reconnecting": "bold red",
}

_EVENT_STYLES = {
    "rejected": "bold red",
    "requeue": "yellow",
    "stale": "yellow",
    "quarantine": "bold red",
    "replica": "yellow",
    "join": "green",
    "leave": "dim",
    "step": "blue",
    "run": "magenta",
    "quality": "cyan",
    "coordinator": "bright_blue",
}

# Medals are for the projector: a class cheers for emoji more than for "1.".  Rich counts
# them as two cells, like every current terminal does, so the columns stay aligned.
_MEDALS = ("🥇", "🥈", "🥉")


def _finite(value: float | None) -> bool:
    numeric = isinstance(value, (int, float, np.floating, np.integer))
    return numeric and math.isfinite(value)  # type: ignore[arg-type]


def sparkline(values: Sequence[float | None], width: int) -> str:
    """Draw ``values`` as one line of ▁▂▃▄▅▆▇█, scaled between their own min and max.

    A live dashboard cares about the latest trend, so when there are more values than
    ``width`` the *last* ``width`` are drawn (the line scrolls as training goes on); fewer
    values give a shorter line rather than a stretched one.  Missing (None) or non-finite
    values become a blank so a gap reads as a gap; a constant series is a flat mid line.
    """
    if width <= 0:
        return ""
    recent = list(values)[-width:]
    finite = [float(v) for v in recent if _finite(v)]
    if not finite:
        return " " * len(recent)
    lo, hi = min(finite), max(finite)
    out: list[str] = []
    for v in recent:
        if not _finite(v):
            out.append(" ")
        elif hi == lo:
            out.append(_TICKS[3])
        else:
            index = round((float(v) - lo) / (hi - lo) * (len(_TICKS) - 1))  # type: ignore[arg-type]
            out.append(_TICKS[min(max(index, 0), len(_TICKS) - 1)])
    return "".join(out)


def format_duration(seconds: float | None) -> str:
    """Compact, fixed-ish width durations: "3s", "2m05s", "1h02m", "2d03h"; "—" when unknown.

    Seconds are floored so a countdown never shows a second that has not started yet.
    """
    if seconds is None or not _finite(seconds):
        return _DASH
    total = max(0, int(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _fit_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """Pixel size of an image downscaled (never enlarged) into max_width x 2*max_height."""
    scale = min(1.0, max_width / width, (2 * max_height) / height)
    w = min(max_width, max(1, round(width * scale)))
    h = min(2 * max_height, max(1, round(height * scale)))
    return w, h


def _as_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr, arr, arr], axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an H x W x 3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def half_block_image(image: np.ndarray, max_width: int, max_height: int) -> Text:
    """Draw an RGB image in text, two pixels per cell, in true colour.

    Each cell is "▀" with the upper pixel as foreground and the lower as background; a
    terminal cell is about twice as tall as wide, so the pixels come out square and the
    picture keeps its aspect ratio.  The image is shrunk with a box (area-average) filter to
    fit ``max_width`` columns x ``max_height`` rows, never enlarged: upscaled faces only
    show bigger blocks.  An odd last pixel row leaves the cell background alone.
    """
    arr = _as_rgb(image)
    if max_width < 1 or max_height < 1:
        return Text()
    h, w = arr.shape[:2]
    tw, th = _fit_size(w, h, max_width, max_height)
    if (tw, th) != (w, h):
        arr = np.asarray(Image.fromarray(arr, "RGB").resize((tw, th), Image.Resampling.BOX))
    text = Text(no_wrap=True, overflow="crop")
    for y in range(0, th, 2):
        if y:
            text.append("\n")
        top = arr[y].tolist()
        bottom = arr[y + 1].tolist() if y + 1 < th else None
        # Runs of equal cells share one span, so flat areas cost one escape code, not many.
        x = 0
        while x < tw:
            end = x + 1
            while end < tw and top[end] == top[x] and (bottom is None or bottom[end] == bottom[x]):
                end += 1
            style = Style(
                color=Color.from_rgb(*top[x]),
                bgcolor=Color.from_rgb(*bottom[x]) if bottom is not None else None,
            )
            text.append("▀" * (end - x), style)
            x = end
    return text


def _bar_text(fraction: float, width: int, style: str = "green") -> Text:
    """A horizontal bar with eighth-cell resolution and a dim track; exactly ``width`` cells."""
    if width <= 0:
        return Text()
    fraction = min(max(fraction if _finite(fraction) else 0.0, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (_EIGHTHS[part] if part and full < width else "")
    text = Text(filled, style=style)
    text.append("─" * (width - len(filled)), style="grey35")
    return text


class _Bar:
    """A progress bar that takes whatever width its table cell gives it.

    Rich's own ProgressBar would do, but it animates from the clock when the total is
    unknown; this one is a plain function of ``fraction`` and the width.
    """

    def __init__(self, fraction: float, style: str = "green") -> None:
        self.fraction = fraction
        self.style = style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield _bar_text(self.fraction, options.max_width, self.style)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(4, options.max_width)


def _fmt_rate(value: float) -> str:
    if not _finite(value) or value <= 0:
        return _DASH
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _fmt_count(n: int) -> str:
    if n < 100_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1e3:.1f}k"
    return f"{n / 1e6:.1f}M"


def _fmt_value(value: float | None) -> str:
    if not _finite(value):
        return _DASH
    v = float(value)  # type: ignore[arg-type]
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"


def _share_cell(share: float) -> Text:
    pct = min(max(share if _finite(share) else 0.0, 0.0), 1.0) * 100
    label = "100%" if pct >= 99.95 else f"{pct:4.1f}%"
    text = Text(label.rjust(5) + " ")
    text.append_text(_bar_text(pct / 100, 5, "bright_blue"))
    return text


def _line(text: Text, width: int) -> Text:
    """One row of text that never wraps: cut with an ellipsis at ``width`` cells."""
    text.no_wrap = True
    text.overflow = "ellipsis"
    text.truncate(max(width, 0), overflow="ellipsis")
    return text


# --------------------------------------------------------------------------- class resources

_KIB = 1024


def _fmt_bytes(n: int) -> str:
    """Memory in binary units, as PyTorch reports it: "54 GiB", "1.5 TiB" (a card sold as
    "12 GB" has 12 GiB, less what the driver keeps)."""
    if n >= _KIB**4:
        return f"{n / _KIB**4:,.1f} TiB"
    if n >= _KIB**3:
        return f"{n / _KIB**3:,.0f} GiB"
    return f"{max(n, 0) / _KIB**2:,.0f} MiB"


def _gpu_label(model: GpuModel) -> str:
    """ "2x RTX 3060 12 GiB": the vendor's brand words go, the projector is narrow."""
    name = model.name or "GPU"
    short = name.removeprefix("NVIDIA ").removeprefix("GeForce ").strip() or name
    memory = f" {model.memory_gib:,} GiB" if model.memory_gib else ""
    return f"{model.count:,}x {short}{memory}"


def _models_text(res: ClassResources, shown: int) -> str:
    labels = [_gpu_label(m) for m in res.gpu_models[:shown]]
    rest = res.gpus - sum(m.count for m in res.gpu_models[:shown])
    if rest > 0 and labels:
        labels.append(f"+{rest:,} more")
    return ", ".join(labels)


def _resources_candidates(res: ClassResources) -> list[Text]:
    """The line from most to least detailed: every GPU model and the unknown count, fewer
    models, no models, then a compact form."""
    bold = "bold"
    workers = max(res.workers, 0)
    if workers == 0:
        return [Text("no workers online", style="grey50")]
    head = Text.assemble((f"{workers:,}", bold), " workers online" if workers != 1 else " worker online")
    if res.unreported >= workers:
        return [Text.assemble(head, (" · hardware unknown", "grey50"))]

    def full(models: int, note: bool) -> Text:
        line = Text.assemble(head, " · ", (f"{max(res.cpu_cores, 0):,}", bold),
                             " CPU core" if res.cpu_cores == 1 else " CPU cores", " · ")
        if res.gpus <= 0:
            line.append("no GPU")
        else:
            line.append_text(Text.assemble((f"{res.gpus:,}", bold), " GPU" if res.gpus == 1 else " GPUs"))
            if res.gpu_memory_bytes > 0:
                line.append_text(Text.assemble(", ", (_fmt_bytes(res.gpu_memory_bytes), bold), " GPU memory"))
            if models:
                line.append(f" ({_models_text(res, models)})")
        if note and res.unreported > 0:
            line.append_text(Text.assemble(" · ", (f"hardware unknown for {res.unreported:,}", "grey50")))
        return line

    n_models = len(res.gpu_models) if res.gpus > 0 else 0
    out = [full(n_models, True)]
    out += [full(k, False) for k in range(n_models, -1, -1)]
    compact = Text.assemble((f"{workers:,}", bold), " online · ", (f"{max(res.cpu_cores, 0):,}", bold), " cores")
    if res.gpus > 0:
        compact.append_text(Text.assemble(" · ", (f"{res.gpus:,}", bold), " GPU" if res.gpus == 1 else " GPUs"))
        if res.gpu_memory_bytes > 0:
            compact.append_text(Text.assemble(" · ", (_fmt_bytes(res.gpu_memory_bytes), bold)))
    out.append(compact)
    return out


def resources_line(res: ClassResources, width: int) -> Text:
    """One line on what the class brings, as detailed as ``width`` cells allow:

        23 workers online · 146 CPU cores · 4 GPUs, 54 GiB GPU memory (2x Tesla T4 15 GiB, 2x RTX 3060 12 GiB)

    GPU models go first when short of room (the last ones become "+N more"), then the
    words ("23 online · 146 cores · 4 GPUs · 54 GiB"), and what is still too long is cut
    with an ellipsis. Model names come from the workers: they are ``Text``, never markup.
    """
    candidates = _resources_candidates(res)
    for line in candidates:
        if line.cell_len <= width:
            return _line(line, width)
    return _line(candidates[-1], width)


# --------------------------------------------------------------------------- cluster view

_HEADER_H = 4  # border, step line, epoch line, border (and the class's resources when known)
_SAMPLE_MIN_ROWS = 6  # below 12 pixels tall a grid of faces is only noise
_EVENTS_WANTED = 6  # event lines shown before the sample may take the spare height
_SERIES_MIN = 2  # G and D loss survive every squeeze
_WIDE = 140  # from here the sample sits beside the tables instead of under them
_LEFT_MIN = 96  # the tables' column when the sample is beside them
_SERIES = (  # (field, label) in display order
    ("g_loss", "G loss"),
    ("d_loss", "D loss"),
    ("d_x", "D(x)"),
    ("d_g_z", "D(G(z))"),
    ("swd", "SWD"),
)
_SERIES_PRIORITY = ("g_loss", "d_loss", "swd", "d_x", "d_g_z")  # what to keep when short


@dataclass(frozen=True)
class _Plan:
    """How many lines each section of the cluster view gets."""

    worker_rows: int
    series: tuple[str, ...]
    event_lines: int  # 0 hides the panel
    show_training: bool
    sample_rows: int  # 0 hides the (stacked) sample panel


def _available_series(snap: ClusterSnapshot) -> tuple[str, ...]:
    has_swd = any(_finite(p.swd) for p in snap.history)
    return tuple(key for key, _ in _SERIES if key != "swd" or has_swd)


def _workers_height(n_workers: int, rows: int) -> int:
    if n_workers == 0:
        return 3  # border, "no workers yet", border
    return 3 + rows + (1 if rows < n_workers else 0)  # borders, header, rows, "+N more"


def _plan_cluster(snap: ClusterSnapshot, width: int, height: int, sample_stacked: bool) -> _Plan:
    """Spend the ``height`` lines below the header: everything wanted, then give up
    sections in a fixed order, then hand spare lines to the sample and the event log."""
    n_workers = len(snap.workers)
    available = _available_series(snap)
    n_events = max(len(snap.events), 1)  # an empty log still says so

    worker_rows = n_workers
    series_count = len(available) if snap.history else 1
    event_lines = min(n_events, _EVENTS_WANTED)
    show_training = True
    show_events = True

    def used() -> int:
        total = _workers_height(n_workers, worker_rows)
        total += (2 + series_count) if show_training else 0
        total += (2 + event_lines) if show_events else 0
        return total

    while used() > height and event_lines > 1:
        event_lines -= 1
    while used() > height and series_count > min(_SERIES_MIN, series_count):
        series_count -= 1
    while used() > height and worker_rows > min(1, n_workers):
        worker_rows -= 1
    if used() > height:
        show_events = False
    if used() > height:
        show_training = False
    # Dropping a whole panel may free more lines than the last cut needed: refill workers.
    while worker_rows < n_workers:
        worker_rows += 1
        if used() > height:
            worker_rows -= 1
            break

    # Spare lines: the sample first (it is the show), then the rest of the log.
    sample_rows = 0
    if sample_stacked and snap.sample is not None:
        spare = height - used() - 2
        h, w = np.asarray(snap.sample).shape[:2]
        natural = math.ceil(_fit_size(w, h, width - 4, 10_000)[1] / 2) if h and w else 0
        if spare >= _SAMPLE_MIN_ROWS and natural:
            sample_rows = min(natural, spare)
    if show_events:
        while event_lines < n_events and used() + (2 + sample_rows if sample_rows else 0) < height:
            event_lines += 1

    if snap.history and show_training:
        keep = [k for k in _SERIES_PRIORITY if k in available][:series_count]
        series = tuple(k for k in available if k in keep)
    else:
        series = ()
    return _Plan(
        worker_rows=worker_rows,
        series=series,
        event_lines=event_lines if show_events else 0,
        show_training=show_training,
        sample_rows=sample_rows,
    )


def _header_height(snap: ClusterSnapshot) -> int:
    return _HEADER_H + (1 if snap.resources is not None else 0)


def _cluster_header(snap: ClusterSnapshot, width: int) -> Panel:
    title = Text.assemble((f"ganns-async {snap.title}", "bold"), " · ")
    title.append(f"run {snap.run_id}" if snap.run_id is not None else "no run")
    title.append(" · ")
    title.append(f"● {snap.status}", _RUN_STATUS_STYLES.get(snap.status, "grey50"))

    if snap.db_ok:
        latency = f" {snap.db_latency_ms:.1f} ms" if _finite(snap.db_latency_ms) else ""
        db = Text(f"● db ok{latency}", style="green")
    else:
        db = Text("● db DOWN", style="bold red")

    grid = Table.grid(padding=(0, 2, 0, 0), expand=True, pad_edge=False)
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1, no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)

    if snap.max_steps:
        fraction = min(max(snap.step / snap.max_steps, 0.0), 1.0)
        step_label = Text.assemble("step ", (f"{snap.step}/{snap.max_steps}", "bold"))
        step_bar: RenderableType = _Bar(fraction, "green")
        step_pct = f"{fraction * 100:.0f}%"
    else:
        step_label = Text.assemble("step ", (f"{snap.step}", "bold"))
        step_bar, step_pct = Text(""), ""
    grid.add_row(
        step_label,
        step_bar,
        step_pct,
        Text.assemble("ETA ", (format_duration(snap.eta_s), "bold")),
        Text.assemble((_fmt_rate(snap.images_per_s), "bold"), " img/s"),
    )
    epoch_fraction = min(max(snap.epoch_fraction if _finite(snap.epoch_fraction) else 0.0, 0.0), 1.0)
    grid.add_row(
        Text.assemble("epoch ", (f"{snap.epoch}", "bold")),
        _Bar(epoch_fraction, "bright_blue"),
        f"{epoch_fraction * 100:.0f}%",
        Text.assemble("step ", (f"{snap.effective_batch:,}", "bold"), " img"),
        Text.assemble("last step ", (format_duration(snap.since_last_step_s), "bold"), " ago"),
    )
    body: RenderableType = grid
    if snap.resources is not None:
        body = Group(grid, resources_line(snap.resources, width - 4))
    return Panel(
        body,
        title=title,
        title_align="left",
        subtitle=db,
        subtitle_align="right",
        height=_header_height(snap),
        border_style="bright_blue",
    )


def _sorted_workers(snap: ClusterSnapshot) -> list[tuple[int | None, WorkerRow]]:
    """Rows in display order with their contribution rank (None outside leaderboard mode).

    The live table puts working machines first; the leaderboard orders purely by images
    contributed, because ranks 1, 2, 5, 3 would read as a bug on the projector.
    """
    by_images = sorted(snap.workers, key=lambda w: (-w.images_done, w.name))
    if snap.leaderboard:
        return [(i + 1, w) for i, w in enumerate(by_images)]
    active = [w for w in by_images if w.state != WorkerState.OFFLINE]
    offline = [w for w in by_images if w.state == WorkerState.OFFLINE]
    return [(None, w) for w in active + offline]


def _workers_panel(snap: ClusterSnapshot, width: int, rows: int) -> Panel:
    inner = width - 4
    # Online as the resources line counts it: a stale worker (silent too long) is not.
    stale = sum(1 for w in snap.workers if w.state == STALE)
    offline = sum(1 for w in snap.workers if w.state == WorkerState.OFFLINE)
    online = len(snap.workers) - stale - offline
    title = Text(f"workers · {online} online")
    if stale:
        title.append(f" · {stale} stale", "yellow")
    if offline:
        title.append(f" · {offline} offline", "grey50")

    if not snap.workers:
        body: RenderableType = Text("no workers yet: students run `ganns-async worker`", style="grey50")
        return Panel(body, title=title, title_align="left", height=3)

    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, expand=True, header_style="bold")
    show_device = inner >= 70
    show_seen = inner >= 60
    if snap.leaderboard:
        table.add_column("#", justify="right", width=3, no_wrap=True)
    table.add_column("name", ratio=1, min_width=6, no_wrap=True, overflow="ellipsis")
    if show_device:
        table.add_column("device", width=7, no_wrap=True, overflow="ellipsis")
    table.add_column("state", width=9, no_wrap=True, overflow="ellipsis")
    table.add_column("units", justify="right", width=5, no_wrap=True, overflow="ellipsis")
    table.add_column("images", justify="right", width=7, no_wrap=True, overflow="ellipsis")
    table.add_column("img/s", justify="right", width=6, no_wrap=True, overflow="ellipsis")
    table.add_column("share", width=11, no_wrap=True, overflow="crop")
    if show_seen:
        table.add_column("seen", justify="right", width=6, no_wrap=True)

    ordered = _sorted_workers(snap)
    for rank, w in ordered[:rows]:
        cells: list[RenderableType] = []
        if snap.leaderboard:
            assert rank is not None
            cells.append(_MEDALS[rank - 1] if rank <= len(_MEDALS) else f"{rank}.")
        cells.append(Text(w.name, style="bold" if w.state != WorkerState.OFFLINE else ""))
        if show_device:
            cells.append(Text(w.device))  # a Text: never parsed as markup
        cells.append(Text(w.state, style=_WORKER_STATE_STYLES.get(w.state, "white")))
        cells += [f"{w.units_done:,}", _fmt_count(w.images_done), _fmt_rate(w.images_per_s), _share_cell(w.share)]
        if show_seen:
            cells.append(format_duration(w.last_seen_s))
        table.add_row(*cells, style="dim" if w.state == WorkerState.OFFLINE else None)

    hidden = len(ordered) - rows
    body = table
    if hidden > 0:
        body = Group(table, Text(f"+{hidden} more", style="grey50"))
    return Panel(body, title=title, title_align="left", height=_workers_height(len(ordered), rows))


def _training_panel(snap: ClusterSnapshot, width: int, series: tuple[str, ...]) -> Panel:
    inner = width - 4
    if not snap.history or not series:
        return Panel(Text("no steps yet", style="grey50"), title="training", title_align="left", height=3)

    labels = dict(_SERIES)
    label_w, value_w = 8, 7
    best_w = 12 if "swd" in series else 0  # room for "best 0.123" only when SWD is shown
    spark_w = max(inner - label_w - value_w - best_w - (3 if best_w else 2), 0)
    title = f"training · last {min(len(snap.history), spark_w)} steps"  # what the sparklines span
    lines: list[Text] = []
    for key in series:
        values = [getattr(p, key) for p in snap.history]
        finite = [float(v) for v in values if _finite(v)]
        if key == "swd":
            # SWD is measured every few steps; squeezing out the gaps keeps its trend readable.
            values = finite
        line = Text()
        line.append(labels[key].ljust(label_w) + " ", style="bold")
        line.append(_fmt_value(finite[-1] if finite else None).rjust(value_w) + " ")
        best = f"best {_fmt_value(min(finite))}" if key == "swd" and finite else ""
        if best_w:
            line.append(best.ljust(best_w) + " ", style="grey50")
        line.append(sparkline(values, spark_w), style=_SERIES_COLORS[key])
        lines.append(_line(line, inner))
    return Panel(Group(*lines), title=title, title_align="left", height=2 + len(lines))


def _events_panel(snap: ClusterSnapshot, width: int, lines: int) -> Panel:
    inner = width - 4
    if not snap.events:
        return Panel(Text("nothing yet", style="grey50"), title="events", title_align="left", height=3)
    shown = snap.events[:lines]
    kind_w = min(max(len(e.kind) for e in snap.events), 11)  # steady while the log scrolls
    rows: list[Text] = []
    for event in shown:
        row = Text()
        row.append(format_duration(event.age_s).rjust(5) + "  ", style="grey50")
        row.append(event.kind[:kind_w].ljust(kind_w), style=_EVENT_STYLES.get(event.kind, "white"))
        row.append("  " + event.message)
        rows.append(_line(row, inner))
    title = "events" if len(shown) == len(snap.events) else f"events · newest {len(shown)} of {len(snap.events)}"
    return Panel(Group(*rows), title=title, title_align="left", height=2 + len(rows))


def _sample_panel(sample: np.ndarray, width: int, rows: int) -> Panel:
    image = half_block_image(sample, width - 4, rows)
    return Panel(
        Align(image, align="center", vertical="top"),
        title="latest sample",
        title_align="left",
        height=rows + 2,
        width=width,
    )


def _cluster_stack(snap: ClusterSnapshot, width: int, height: int, sample_stacked: bool) -> list[RenderableType]:
    plan = _plan_cluster(snap, width, height, sample_stacked)
    parts: list[RenderableType] = [_workers_panel(snap, width, plan.worker_rows)]
    if plan.show_training:
        parts.append(_training_panel(snap, width, plan.series))
    if plan.sample_rows and snap.sample is not None:
        parts.append(_sample_panel(snap.sample, width, plan.sample_rows))
    if plan.event_lines:
        parts.append(_events_panel(snap, width, plan.event_lines))
    return parts


def render_cluster(snap: ClusterSnapshot, width: int = 100, height: int = 30) -> RenderableType:
    """The coordinator / projector view of the whole class, fitted to ``width`` x ``height``.

    The header holds the step, the epoch and, when the snapshot has them, the resources of
    the class (one line: workers online, CPU cores, GPUs).  Narrow terminals stack header,
    workers, training, sample and events, dropping the sample first when short of lines.
    From 140 columns the sample gets its own column to the right of the tables, as tall as
    the body, so it no longer competes for lines.
    """
    header = _cluster_header(snap, width)
    body_h = height - _header_height(snap)
    if width >= _WIDE and snap.sample is not None and body_h - 2 >= _SAMPLE_MIN_ROWS:
        h, w = np.asarray(snap.sample).shape[:2]
        tw, _ = _fit_size(w, h, width - _LEFT_MIN - 4, body_h - 2) if h and w else (0, 0)
        if tw >= 16:
            sample_w = tw + 4
            left_w = width - sample_w
            grid = Table.grid(expand=True)
            grid.add_column(width=left_w)
            grid.add_column(width=sample_w)
            grid.add_row(
                Group(*_cluster_stack(snap, left_w, body_h, sample_stacked=False)),
                _sample_panel(snap.sample, sample_w, body_h - 2),
            )
            return Constrain(Group(header, grid), width)
    return Constrain(Group(header, *_cluster_stack(snap, width, body_h, sample_stacked=True)), width)


# --------------------------------------------------------------------------- worker view


def render_worker(snap: WorkerSnapshot, width: int = 100, height: int = 24) -> RenderableType:
    """A student's own view: am I connected, what am I computing, how much have I given.

    The status panel always shows; the recent-losses panel is dropped first and the
    message line last when the terminal is short.
    """
    inner = width - 4
    title = Text.assemble(("ganns-async worker", "bold"), f" · {snap.name}")

    grid = Table.grid(padding=(0, 2, 0, 0), expand=True, pad_edge=False)
    grid.add_column(style="grey50", no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_column(ratio=1, no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)

    connection_style = _CONNECTION_STYLES.get(snap.connection, "grey50")
    grid.add_row("connection", Text(f"● {snap.connection}", style=connection_style))
    run = Text(str(snap.run_id), style="bold") if snap.run_id is not None else Text("waiting for a run", "grey50")
    grid.add_row("run", run)
    grid.add_row("state", Text(snap.state, style=_WORKER_STATE_STYLES.get(snap.state, "white")))
    if snap.unit_id is not None:
        unit = Text()
        unit.append(f"#{snap.unit_id}", style="bold")
        if snap.unit_step is not None:
            unit.append(f" · step {snap.unit_step}")
    else:
        unit = Text(_DASH, style="grey50")
    if snap.unit_progress is not None and _finite(snap.unit_progress):
        fraction = min(max(snap.unit_progress, 0.0), 1.0)
        grid.add_row("unit", unit, _Bar(fraction, "green"), f"{fraction * 100:.0f}%")
    else:
        grid.add_row("unit", unit)
    grid.add_row("speed", Text.assemble((_fmt_rate(snap.images_per_s), "bold"), f" img/s on {snap.device}"))
    grid.add_row(
        "contributed",
        Text.assemble(
            (f"{snap.units_done:,}", "bold"), " units · ", (_fmt_count(snap.images_done), "bold"), " images"
        ),
    )
    if snap.rank is not None:
        rank = Text()
        rank.append(f"#{snap.rank}", style="bold")
        if snap.workers_total is not None:
            rank.append(f" of {snap.workers_total}")
    else:
        rank = Text(_DASH, style="grey50")
    grid.add_row("rank", rank)

    status_h = 2 + grid.row_count
    parts: list[RenderableType] = [
        Panel(
            grid,
            title=title,
            title_align="left",
            height=status_h,
            border_style="bright_blue",
        )
    ]

    message = _line(Text(snap.message, style="italic"), width) if snap.message else None
    losses_h = 4 if snap.recent_losses else 3
    if status_h + losses_h + (1 if message else 0) <= height:
        if snap.recent_losses:
            label_w, value_w = 8, 8
            spark_w = max(inner - label_w - value_w - 2, 0)
            lines = []
            for label, idx, key in (("D loss", 0, "d_loss"), ("G loss", 1, "g_loss")):
                values = [pair[idx] for pair in snap.recent_losses]
                latest = next((v for v in reversed(values) if _finite(v)), None)
                line = Text()
                line.append(label.ljust(label_w) + " ", style="bold")
                line.append(_fmt_value(latest).rjust(value_w) + " ")
                line.append(sparkline(values, spark_w), style=_SERIES_COLORS[key])
                lines.append(_line(line, inner))
            body: RenderableType = Group(*lines)
            losses_title = f"my last {len(snap.recent_losses)} units"
        else:
            body = Text("no units finished yet", style="grey50")
            losses_title = "my units"
        parts.append(Panel(body, title=losses_title, title_align="left", height=losses_h))
    if message is not None and status_h + 1 <= height:
        parts.append(message)
    return Constrain(Group(*parts), width)
