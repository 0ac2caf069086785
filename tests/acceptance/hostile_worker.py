"""A worker that lies: every result it sends is tampered with (for test_hostile_run.py and
test_replication_run.py, next to it).

    python tests/acceptance/hostile_worker.py ATTACK DB_URL DATA NAME

ATTACK is scale (x1e6), flip (sign flipped, x1e3), huge (one element +3e38) or negate (sign
flipped, same size: it passes every screen, and only replication can catch it). It is the
real worker otherwise: it claims, heartbeats and uploads through the same API as an honest one.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import torch

from ganns_async import codec
from ganns_async.worker import Worker, WorkerOptions


def tamper(t: torch.Tensor, attack: str) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    if attack == "scale":
        return t * 1e6
    if attack == "flip":
        return t * -1e3
    if attack == "negate":
        return -t
    if attack == "huge":
        t = t.clone()
        t.view(-1)[0] = 3e38
        return t
    raise SystemExit(f"unknown attack {attack!r}")


class HostileWorker(Worker):
    attack = "scale"

    def _compute(self, indices, noise_seed):  # type: ignore[no-untyped-def]
        blob, n, bad, metrics = super()._compute(indices, noise_seed)
        tensors, meta = codec.decode_tensors(blob)
        forged = {k: tamper(v, self.attack) if not k.endswith(("running_mean", "running_var")) else v
                  for k, v in tensors.items()}
        return codec.encode_tensors(forged, meta=meta, float_dtype="fp32"), n, bad, metrics


def main() -> int:
    attack, url, data, name = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    HostileWorker.attack = attack
    return asyncio.run(HostileWorker(WorkerOptions(db_url=url, data=data, name=name, threads=1)).run())


if __name__ == "__main__":
    sys.exit(main())
