"""Replication, as BOINC does it: some units are computed twice, by different logins, and
the two results must agree before either counts.

Units are deterministic (indices and noise seed are in the unit), so two honest workers
compute the same thing, up to floating point: bitwise on the same kind of machine with
deterministic kernels, within a small error across machines (other SIMD paths, other
thread counts, TF32 on a GPU). :func:`compare` measures the difference; the tolerances
below say how much is honest (measured with ``scripts/bench_replica_tolerance.py``; see SECURITY.md).

Which units are replicated (:class:`SpotCheck`): a worker's first ``new_worker_checks``
results, then a random ``rate`` of the rest (``coordinator --spot-check``).
When two results disagree, a third worker decides: the result that agrees with it counts,
and the worker whose result agrees with neither is quarantined.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from ganns_async.training import UnitResult

NEW_WORKER_CHECKS = 2


@dataclass(frozen=True)
class Tolerance:
    """Honest disagreement: the whole result's cosine similarity at least ``min_cosine``; no
    network's parameters (or BatchNorm statistics) with a relative L2 error over
    ``max_rel_l2``, or a norm more than ``max_norm_ratio`` times the other's."""

    min_cosine: float
    max_rel_l2: float
    max_norm_ratio: float


# Measured on an H100 against a CPU, units of 32 (scripts/bench_replica_tolerance.py):
# exact mode (gradients): CPU 1 vs 2 threads 1.6e-6; CUDA with TF32 cosine 0.99952, relative
# L2 up to 0.044; CUDA without TF32 0.0012. Local mode (32 Adam steps): chaotic in the small:
# Adam's first steps move every weight by about lr whatever the sign of a near-zero
# gradient, so even two CPUs with other thread counts agree only to cosine 0.980 and G's
# relative L2 0.55 (CUDA: 0.976 and 0.63). A sign flip has cosine -1, noise cosine ~0, and a
# scaled result shows in the norm ratio; tolerances sit well outside the honest figures.
EXACT_TOLERANCE = Tolerance(min_cosine=0.99, max_rel_l2=0.25, max_norm_ratio=1.25)
LOCAL_TOLERANCE = Tolerance(min_cosine=0.90, max_rel_l2=1.0, max_norm_ratio=1.5)
TOLERANCE = EXACT_TOLERANCE


@dataclass(frozen=True)
class Agreement:
    bitwise: bool
    cosine: float
    max_rel_l2: float
    worst: str  # the part with the largest relative error ("D parameters", ...)
    norm_ratio: float = 1.0  # the largest ratio of the two results' norms, over the parts

    def within(self, tol: Tolerance = TOLERANCE) -> bool:
        return self.bitwise or (self.cosine >= tol.min_cosine and self.max_rel_l2 <= tol.max_rel_l2
                                and self.norm_ratio <= tol.max_norm_ratio)

    def describe(self) -> str:
        if self.bitwise:
            return "bitwise equal"
        return (f"cosine {self.cosine:.6f}, relative L2 error up to {self.max_rel_l2:.3g} ({self.worst}), "
                f"norm ratio up to {self.norm_ratio:.3g}")


def _group(name: str, buffers: set[str]) -> str:
    """Errors are measured per network and kind: a single small tensor (a bias whose change
    is mostly noise) can differ by 20% between honest machines after 8 local steps, while
    the network as a whole agrees to 1e-3 (scripts/bench_replica_tolerance.py)."""
    return name[:1] + (" BatchNorm statistics" if name in buffers else " parameters")


def compare(a: UnitResult, b: UnitResult) -> Agreement:
    """How far apart two results of the same unit are (parameters' gradients or changes, and
    BatchNorm statistics): bitwise equality, cosine similarity of the whole result, and the
    relative L2 error of each network's parameters and statistics."""
    ta, tb = a.tensors(), b.tensors()
    if ta.keys() != tb.keys() or a.n_samples != b.n_samples:
        return Agreement(False, -1.0, math.inf, "different tensors or sample counts")
    bitwise = all(torch.equal(ta[k], tb[k]) for k in ta)
    buffers = set(a.buffers)
    dot = na = nb = 0.0
    diff2: dict[str, float] = {}
    norm2: dict[str, float] = {}
    sq_a: dict[str, float] = {}
    sq_b: dict[str, float] = {}
    for k in ta:
        if not ta[k].is_floating_point():
            if not torch.equal(ta[k], tb[k]):
                return Agreement(False, -1.0, math.inf, k)
            continue
        x, y = ta[k].double().flatten(), tb[k].double().flatten()
        xx, yy = float(x @ x), float(y @ y)
        dot += float(x @ y)
        na += xx
        nb += yy
        group = _group(k, buffers)
        diff2[group] = diff2.get(group, 0.0) + float((x - y) @ (x - y))
        norm2[group] = norm2.get(group, 0.0) + max(xx, yy)
        sq_a[group] = sq_a.get(group, 0.0) + xx
        sq_b[group] = sq_b.get(group, 0.0) + yy
    worst, worst_name, ratio = 0.0, "", 1.0
    for group, d2 in diff2.items():
        rel = math.sqrt(d2 / max(norm2[group], 1e-300))
        if rel > worst:
            worst, worst_name = rel, group
        small, big = sorted((sq_a[group], sq_b[group]))
        if big > 0:
            ratio = max(ratio, math.sqrt(big / small) if small > 0 else math.inf)
    cosine = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return Agreement(bitwise, cosine, worst, worst_name, ratio)


@dataclass
class SpotCheck:
    """Which results are replicated before they count."""

    rate: float = 0.05
    new_worker_checks: int = NEW_WORKER_CHECKS
    seed: int = 0
    _agreed: dict[int, int] = field(default_factory=dict)  # worker id -> results confirmed
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"spot_check must be between 0 and 1, got {self.rate}")
        self._rng = random.Random(self.seed)

    def wanted(self, worker_id: int | None) -> bool:
        """Replicate this worker's result? Always for a new worker; at ``rate`` afterwards.
        A rate of 0 turns replication off."""
        if self.rate <= 0:
            return False
        if worker_id is not None and self._agreed.get(worker_id, 0) < self.new_worker_checks:
            return True
        return self._rng.random() < self.rate

    def confirmed(self, worker_id: int | None) -> None:
        if worker_id is not None:
            self._agreed[worker_id] = self._agreed.get(worker_id, 0) + 1
