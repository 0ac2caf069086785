"""Benchmark process start-up: what a worker or a coordinator imports before it can work.

Every student's worker, every coordinator (and every test that starts one) pays this once.
Each figure is the wall time of a fresh ``python -c "import ..."`` (so it includes the
interpreter's own start), median of ``--repeat`` runs, the variants interleaved so that a
noisy machine slows them alike:

* ``worker`` / ``coordinator``: the modules the CLI imports for ``ganns-async worker`` /
  ``ganns-async coordinator``;
* ``... + torchvision``: the same with torchvision imported too, which is what the data
  pipeline did before it computed the model card's transform itself (torchvision pulls in
  torch._dynamo and sympy);
* ``torch``: PyTorch alone, the floor.

Not measured: the first optimizer a process makes imports torch._dynamo (about 2 s here),
because torch.optim's constructors are wrapped by it; the coordinator, and a worker in
local mode, pay that at their first step whatever we import.

    python scripts/bench_startup.py --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "torch": "import torch",
    "worker": "import ganns_async.worker",
    "worker + torchvision": "import ganns_async.worker, torchvision",
    "coordinator": "import ganns_async.coordinator",
    "coordinator + torchvision": "import ganns_async.coordinator, torchvision",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs of each variant (default 7)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeat):
        for name, code in VARIANTS.items():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, med in medians.items():
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        print(f"{name:28s} median {med:5.2f} s  (range {spread} s, {args.repeat} runs)")
    for role in ("worker", "coordinator"):
        with_tv = medians[f"{role} + torchvision"]
        print(f"{role}: {medians[role]:.2f} s, {with_tv - medians[role]:.2f} s less than with torchvision "
              f"({medians[role] / with_tv:.2f}x)")


if __name__ == "__main__":
    main()
