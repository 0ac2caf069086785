"""What a worker runs on: device choice and a one-line description for the dashboard."""

from __future__ import annotations

import os
import platform

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
