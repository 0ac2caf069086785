"""The class's resources on the dashboards (the header's third line), the totals' parsing, and
what a worker reports about itself: pure views rendered to a recording Console. (The numbers
from a real PostgreSQL: tests/integration/test_resources.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from ganns_async.cluster_state import class_resources, plain_line
from ganns_async.dashboard import (
    ClassResources,
    ClusterSnapshot,
    EventLine,
    GpuModel,
    WorkerRow,
    render_cluster,
    resources_line,
)
from ganns_async.hardware import Resources, resources

GIB = 2**30
MIXED = ClassResources(workers=23, unreported=0, cpu_cores=146, gpus=4, gpu_memory_bytes=(2 * 15 + 2 * 12) * GIB,
                       gpu_models=(GpuModel("Tesla T4", 15, 2), GpuModel("NVIDIA GeForce RTX 3060", 12, 2)))
CPU_ONLY = ClassResources(workers=12, unreported=0, cpu_cores=48, gpus=0, gpu_memory_bytes=0)
NOBODY = ClassResources(workers=0, unreported=0, cpu_cores=0, gpus=0, gpu_memory_bytes=0)
# What 30 hostile logins can make the server store: 8 workers online each (sql/003_roles.sql),
# each at the top of every range of sql/005_resources.sql, under 64-character names (with Rich
# markup, which the server would strip: the view must not care either way).
ABSURD = ClassResources(
    workers=240, unreported=0, cpu_cores=240 * 1024, gpus=240, gpu_memory_bytes=240 * 2**40,
    gpu_models=tuple(GpuModel(f"[bold red]{i}[/]" + "W" * 54, 1024, 30) for i in range(8)))

WORKERS = (
    WorkerRow("alice", "cuda:0", "computing", 41, 10_496, 182.4, 0.41, 0.8),
    WorkerRow("bob", "cpu", "idle", 12, 3_072, 21.0, 0.12, 1.5),
    WorkerRow("dave", "cuda", "stale", 9, 2_304, 0.0, 0.09, 47.0),
    WorkerRow("erin", "cpu", "offline", 18, 4_608, 0.0, 0.18, 725.0),
)


def snapshot(resources: ClassResources | None, **changes: object) -> ClusterSnapshot:
    base = dict(
        title="watch", run_id=3, status="running", step=12, max_steps=40, epoch=2, epoch_fraction=0.45,
        images_per_s=203.4, effective_batch=256, since_last_step_s=3.2, eta_s=125.0, db_ok=True,
        db_latency_ms=1.2, workers=WORKERS, history=(), events=(EventLine(2, "join", "alice joined on cuda:0"),),
        leaderboard=True, resources=resources,
    )
    base.update(changes)
    return ClusterSnapshot(**base)  # type: ignore[arg-type]


def rendered(snap: ClusterSnapshot, width: int, height: int) -> str:
    c = Console(record=True, width=width, color_system="truecolor")
    c.print(render_cluster(snap, width, height))
    text = c.export_text()
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height, f"{len(lines)} lines > {height}:\n{text}"
    assert all(len(line.rstrip()) <= width for line in lines), text
    return text


def header_line(text: str) -> str:
    """The header's third line (the resources), without its borders."""
    return text.splitlines()[3].strip("│ ")


def test_mixed_gpus_at_full_width() -> None:
    text = rendered(snapshot(MIXED), 120, 30)
    assert header_line(text) == ("23 workers online · 146 CPU cores · 4 GPUs, 54 GiB GPU memory "
                                 "(2x Tesla T4 15 GiB, 2x RTX 3060 12 GiB)")
    assert "╰" in text.splitlines()[4]  # the header grew by exactly that line


def test_cpu_only_class() -> None:
    text = rendered(snapshot(CPU_ONLY), 100, 30)
    assert header_line(text) == "12 workers online · 48 CPU cores · no GPU"


def test_no_workers_online() -> None:
    text = rendered(snapshot(NOBODY, workers=()), 100, 30)
    assert header_line(text) == "no workers online"
    assert "no workers yet" in text


def test_one_of_each_is_singular() -> None:
    one = ClassResources(workers=1, unreported=0, cpu_cores=1, gpus=1, gpu_memory_bytes=8 * GIB,
                         gpu_models=(GpuModel(None, None, 1),))
    line = resources_line(one, 200).plain
    assert line == "1 worker online · 1 CPU core · 1 GPU, 8 GiB GPU memory (1x GPU)"


def test_workers_that_did_not_say_are_counted_apart() -> None:
    some = ClassResources(workers=5, unreported=2, cpu_cores=12, gpus=1, gpu_memory_bytes=12 * GIB,
                          gpu_models=(GpuModel("NVIDIA GeForce RTX 3060", 12, 1),))
    assert resources_line(some, 200).plain == (
        "5 workers online · 12 CPU cores · 1 GPU, 12 GiB GPU memory (1x RTX 3060 12 GiB) · hardware unknown for 2")
    everyone = ClassResources(workers=3, unreported=3, cpu_cores=0, gpus=0, gpu_memory_bytes=0)
    assert resources_line(everyone, 200).plain == "3 workers online · hardware unknown"


def test_narrower_lines_give_up_detail_in_order() -> None:
    widths = {w: resources_line(MIXED, w).plain for w in (200, 95, 80, 45, 30)}
    assert widths[200].endswith("(2x Tesla T4 15 GiB, 2x RTX 3060 12 GiB)")
    assert widths[95].endswith("(2x Tesla T4 15 GiB, +2 more)")  # the last models first
    assert widths[80] == "23 workers online · 146 CPU cores · 4 GPUs, 54 GiB GPU memory"
    assert widths[45] == "23 online · 146 cores · 4 GPUs · 54 GiB"  # then the words
    assert widths[30].endswith("…") and len(widths[30]) == 30  # then an ellipsis
    for width, line in widths.items():
        assert len(line) <= width


@pytest.mark.parametrize("size", [(40, 12), (60, 15), (80, 24), (100, 30), (140, 30), (200, 50)])
def test_every_size_fits(size: tuple[int, int]) -> None:
    width, height = size
    for res in (MIXED, CPU_ONLY, NOBODY, ABSURD, None):
        text = rendered(snapshot(res), width, height)
        if res is not None and width >= 60:
            assert "online" in header_line(text)


def test_absurd_but_allowed_values_stay_readable() -> None:
    text = rendered(snapshot(ABSURD), 200, 30)
    line = header_line(text)
    assert line.startswith("240 workers online · 245,760 CPU cores · 240 GPUs, 240.0 TiB GPU memory (30x [bold red]0[/]")
    assert line.endswith("WWW 1,024 GiB, +210 more)")  # markup shown as typed; the GPUs left out counted
    narrow = header_line(rendered(snapshot(ABSURD), 60, 15))
    assert narrow == "240 online · 245,760 cores · 240 GPUs · 240.0 TiB"


def test_header_line_costs_one_line_and_the_body_adapts() -> None:
    without = rendered(snapshot(None), 80, 24)
    with_line = rendered(snapshot(MIXED), 80, 24)
    assert "CPU cores" not in without
    assert len(with_line.splitlines()) <= 24
    for name in ("alice", "bob", "dave", "erin"):
        assert name in with_line  # the event log gives way, not the workers


def test_workers_title_counts_stale_apart() -> None:
    text = rendered(snapshot(MIXED), 100, 30)
    assert "workers · 2 online · 1 stale · 1 offline" in text


def test_plain_line_has_the_totals() -> None:
    assert "online=23 cores=146 gpus=4 gpu_mem_gib=54 workers=[" in plain_line(snapshot(MIXED))
    assert "cores=" not in plain_line(snapshot(None))


def row(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"workers": 23, "reporting": 21, "cpu_cores": 146, "gpus": 4,
                               "gpu_memory_bytes": 54 * GIB,
                               "gpu_models": json.dumps([{"name": "Tesla T4", "gib": 15, "count": 2},
                                                         {"name": "NVIDIA GeForce RTX 3060", "gib": 12, "count": 2}])}
    base.update(changes)
    return base


def test_totals_from_the_view_row() -> None:
    res = class_resources(row())
    assert res == ClassResources(23, 2, 146, 4, 54 * GIB,
                                 (GpuModel("Tesla T4", 15, 2), GpuModel("NVIDIA GeForce RTX 3060", 12, 2)))
    assert class_resources(None) is None


def test_totals_row_that_makes_no_sense_still_renders() -> None:
    odd = class_resources(row(
        reporting=40, cpu_cores=-3, gpu_memory_bytes=None,
        gpu_models=json.dumps([{"name": "\x1b]52;c;aGk=\x07evil\u202e", "gib": "12", "count": 1},
                               {"name": None, "gib": None, "count": 1},
                               {"count": "many"}, {"name": "x", "count": 0}, "junk"])))
    assert odd is not None
    assert odd.unreported == 0 and odd.cpu_cores == 0 and odd.gpu_memory_bytes == 0
    assert [m.count for m in odd.gpu_models] == [1, 1]
    name = odd.gpu_models[0].name
    assert name is not None and name.isprintable() and "\x1b" not in name and "\u202e" not in name
    assert odd.gpu_models[0].memory_gib is None  # a string is not a size
    assert class_resources(row(gpu_models="not json")).gpu_models == ()  # type: ignore[union-attr]
    assert class_resources(row(gpu_models=json.dumps({"a": 1}))).gpu_models == ()  # type: ignore[union-attr]
    rendered(snapshot(odd), 100, 30)


def test_a_cpu_worker_reports_the_threads_it_computes_with() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what --threads 1 does
        assert resources(torch.device("cpu")) == Resources(cpu_cores=1, gpu_count=0, gpu_memory_bytes=None,
                                                           gpu_name=None)
    finally:
        torch.set_num_threads(before)
    assert resources(torch.device("cpu")).cpu_cores == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_worker_reports_its_one_gpu() -> None:
    got = resources(torch.device("cuda"))
    props = torch.cuda.get_device_properties(0)
    assert got.gpu_count == 1 and got.gpu_memory_bytes == props.total_memory and got.gpu_name == props.name
