"""What a worker runs on: device choice, a one-line description for the instructor, and the
numbers the projector adds up (``sql/005_resources.sql``)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from ganns_async.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(requested: str) -> torch.device:
    requested = requested.lower()
    if requested not in DEVICES:
        raise UserError(f"unknown device {requested!r}: choose one of {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU here: use --device cpu or auto")
    if requested == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError("--device mps asked for, but Metal is not available here: use --device cpu or auto")
    return torch.device(requested)


def cpu_info() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count() or '?'} cores, {torch.get_num_threads()} threads)"


def gpu_info(device: torch.device) -> str | None:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    if device.type == "mps":
        return "Apple Metal (mps)"
    return None


@dataclass(frozen=True)
class Resources:
    """What one worker brings to the class: the numbers ``ganns_api.register`` stores.

    ``cpu_cores`` is ``torch.get_num_threads()``, the threads this worker computes with
    (``--threads``, else PyTorch's default for the machine), not ``os.cpu_count()``: that
    counts every logical CPU of the host, hyperthreads twice and a whole server behind a
    2-CPU container. The GPU is the one device the worker trains on (``--device``): a
    machine with four GPUs and one worker brings one.
    """

    cpu_cores: int
    gpu_count: int  # 0 or 1
    gpu_memory_bytes: int | None  # None without a GPU, or when the backend does not say
    gpu_name: str | None


def resources(device: torch.device) -> Resources:
    """This worker's :class:`Resources` on ``device``. Cheap: the device is initialized
    already when the worker registers, and nothing here starts a process or loads a library."""
    cores = torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Resources(cores, 1, int(props.total_memory), props.name)
    if device.type == "mps":
        # Unified memory: the share Metal recommends for one process is what training can use.
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        try:
            memory = int(recommended()) if recommended is not None else None
        except Exception:  # noqa: BLE001 - an older macOS or PyTorch: unknown, not fatal
            memory = None
        return Resources(cores, 1, memory, "Apple GPU (mps)")
    return Resources(cores, 0, None, None)
