"""Screening unit results before they count: outliers are refused, never clipped.

A worker's result passes the codec (names, shapes, finite values) and
:func:`~ganns_async.training.check_result` (no negative variances, no change larger than
the unit's Adam steps can make). Here it is compared with the results accepted so far:

* every gradient (or local change) element is bounded, so Adam's second moment, a square,
  stays finite whatever arrives (a finite 3e38 would overflow it to Inf);
* BatchNorm statistics are bounded (a variance of 1e6 or a mean of 1e4 is no honest batch);
* the G and D norms of a unit may be at most ``factor`` times the running median of the
  accepted units' norms. Measured on the model card's DCGAN (scripts/bench... and the
  figures in SECURITY.md): honest exact-mode D norms move between 3.6 and 49 within a dozen
  steps, so the factor is a generous 20; a unit scaled by 1e3 or 1e6 is far outside it.

A refused unit goes back to pending and the server gives it to another worker (or login), so
only honest work shapes the model; a unit refused three times is given up on.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

import torch

from ganns_async.training import UnitResult

MAX_ELEMENT = 1e3          # honest exact-mode gradients measured below ~3.3 per element
MAX_BN_MEAN = 1e4
MAX_BN_VAR = 1e6
NORM_FACTOR = 20.0
NORM_WINDOW = 64           # accepted units the median is taken over
NORM_WARMUP = 4            # accepted units before the median is trusted


@dataclass(frozen=True)
class Norms:
    g: float
    d: float


def _norm(tensors: list[torch.Tensor]) -> float:
    total = 0.0
    for t in tensors:
        total += float(torch.linalg.vector_norm(t.double())) ** 2
    return math.sqrt(total)


class ResultScreen:
    """Running medians of accepted norms; :meth:`check` runs on decoder threads."""

    def __init__(self, *, factor: float = NORM_FACTOR, window: int = NORM_WINDOW, warmup: int = NORM_WARMUP) -> None:
        self.factor = factor
        self.warmup = warmup
        self._g: deque[float] = deque(maxlen=window)
        self._d: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def medians(self) -> Norms | None:
        with self._lock:
            if len(self._g) < self.warmup:
                return None
            return Norms(statistics.median(self._g), statistics.median(self._d))

    def check(self, result: UnitResult) -> tuple[str | None, Norms]:
        """``(why it is refused or None, its norms)``."""
        for k, v in result.grads.items():
            biggest = float(v.abs().max()) if v.numel() else 0.0
            if biggest > MAX_ELEMENT:
                return f"{k} has an element of {biggest:.3g} (at most {MAX_ELEMENT:g})", Norms(math.inf, math.inf)
        for k, v in result.buffers.items():
            if not v.is_floating_point() or not v.numel():
                continue
            if k.endswith("running_var"):
                if bool((v < 0).any()) or float(v.max()) > MAX_BN_VAR:
                    return f"{k} is outside 0..{MAX_BN_VAR:g}", Norms(math.inf, math.inf)
            elif float(v.abs().max()) > MAX_BN_MEAN:
                return f"{k} is outside +-{MAX_BN_MEAN:g}", Norms(math.inf, math.inf)
        norms = Norms(_norm([v for k, v in result.grads.items() if k.startswith("G.")]),
                      _norm([v for k, v in result.grads.items() if k.startswith("D.")]))
        median = self.medians()
        if median is not None:
            for net, value, typical in (("G", norms.g, median.g), ("D", norms.d, median.d)):
                if value > self.factor * typical:
                    return (f"{net} norm {value:.3g} is over {self.factor:g} x the median of accepted units "
                            f"({typical:.3g})"), norms
        return None, norms

    def accept(self, norms: Norms) -> None:
        """A checked result was folded: it joins the medians."""
        with self._lock:
            self._g.append(norms.g)
            self._d.append(norms.d)
