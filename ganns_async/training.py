"""GAN math shared by workers, the coordinator and the single-process trainer.

A work unit is (image indices, noise seed, weights version). Everything it produces
depends on the unit alone, so any worker - or ``train-local`` - computes the same
gradient for it (bitwise on one machine and thread count).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ganns_async.model import FEATURE_MAPS, LATENT_DIM, Discriminator, Generator, build_models

PREFIXES = ("G.", "D.")
EMA_PREFIX = "EMA.G."  # G's moving average inside the optimizer-state blob


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run's arithmetic; stored with the run as JSON."""

    seed: int = 0
    unit_size: int = 64  # images per inner step of a unit (the batch a worker trains on)
    # Units per round (one published version); 0 = "auto": as many as workers are online
    # when the round is planned, at least 1.
    units_per_step: int = 2
    max_staleness: int = 1  # a result computed on version >= step - K still counts
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # Gradients on the wire: bf16 is 2.4x smaller and learned as well as fp32 in the demo
    # (README, "Benchmarks"); fp32 makes a staleness-0 run equal train-local exactly.
    grad_dtype: str = "bf16"
    # Exponential moving average of G's weights, the generator users sample (ProGAN's Gs).
    # Warmed up as ``min(g_ema, (1 + t) / (10 + t))`` after t updates, so a short run
    # averages over a short window and a long one over about 1 / (1 - g_ema) steps; 0 = off.
    g_ema: float = 0.999
    # Local steps. 1: a unit is one gradient, the coordinator steps Adam (exact mode: a
    # staleness-0 fp32 run equals train-local bit for bit). H > 1: a unit is H alternating
    # D/G Adam steps of ``unit_size`` images from the unit's version, with a fresh inner
    # Adam; the worker returns the parameter change and the coordinator applies the
    # image-weighted mean with an outer SGD step (lr 1, momentum 0 is FedAvg; DiLoCo's
    # Nesterov outer step is lr 0.7, momentum 0.9).
    local_steps: int = 1
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    # The networks' width (DCGAN's ngf = ndf). 64 is the model card's DCGAN; compute and
    # the bytes on the wire grow with its square (32: a quarter of both).
    feature_maps: int = FEATURE_MAPS

    @property
    def local(self) -> bool:
        return self.local_steps > 1

    @property
    def broadcast_dtype(self) -> str:
        """The published weights' wire format. Local mode sends them in ``grad_dtype`` too
        (bf16 halves the download; a worker's change is measured from the weights it got,
        and the coordinator keeps the fp32 master copy). Exact mode always sends fp32."""
        return self.grad_dtype if self.local else "fp32"

    @property
    def images_per_unit(self) -> int:
        return self.unit_size * self.local_steps

    @property
    def auto_width(self) -> bool:
        return self.units_per_step == 0

    def check(self) -> None:
        """ValueError with a one-line reason for settings no run can use."""
        if self.unit_size < 1:
            raise ValueError(f"unit size must be at least 1, got {self.unit_size}")
        if self.units_per_step < 0:
            raise ValueError(f"units per step must be >= 1 or auto, got {self.units_per_step}")
        if self.max_staleness < 0:
            raise ValueError(f"max staleness must be >= 0, got {self.max_staleness}")
        if not 1 <= self.local_steps <= 4096:
            raise ValueError(f"local steps must be between 1 and 4096, got {self.local_steps}")
        if not 0.0 < self.outer_lr <= 10.0:
            raise ValueError(f"outer lr must be in (0, 10], got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.outer_momentum}")
        if self.grad_dtype not in ("fp32", "bf16"):
            raise ValueError(f"wire dtype must be fp32 or bf16, not {self.grad_dtype!r}")
        if not 0.0 <= self.g_ema < 1.0:
            raise ValueError(f"g_ema must be in [0, 1), got {self.g_ema}")
        if not 1 <= self.feature_maps <= 512:
            raise ValueError(f"feature maps must be between 1 and 512, got {self.feature_maps}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, value: str | Mapping[str, Any]) -> "TrainConfig":
        """From ``runs.config`` (asyncpg hands jsonb over as text)."""
        return cls.from_mapping(json.loads(value) if isinstance(value, str) else value)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --- the unit schedule -----------------------------------------------------------


@dataclass(frozen=True)
class UnitPlan:
    seq: int
    step: int
    epoch: int
    indices: list[int]
    noise_seed: int


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch`` visits every image exactly once, in a seeded order."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 0x5EED])))
    return rng.permutation(n)


def plan_unit(cfg: TrainConfig, dataset_size: int, seq: int, step: int | None = None) -> UnitPlan:
    """Unit ``seq`` covers positions [seq*N, (seq+1)*N) of the endless epoch stream, where
    N = unit_size x local_steps (inner step i trains on the i-th slice of U images).

    ``step`` is the round the unit feeds; with a fixed width it follows from ``seq``,
    with ``units_per_step`` auto the coordinator says.
    """
    n = cfg.images_per_unit
    start = seq * n
    # Slices of each epoch's permutation, not a Python loop per image: a round of a
    # class's local units is tens of thousands of indices, planned on the event loop.
    parts = []
    pos, end = start, start + n
    while pos < end:
        epoch, offset = divmod(pos, dataset_size)
        take = min(end - pos, dataset_size - offset)
        parts.append(epoch_permutation(cfg.seed, epoch, dataset_size)[offset:offset + take])
        pos += take
    indices = [int(i) for i in np.concatenate(parts)]
    noise_seed = int(np.random.SeedSequence([cfg.seed, seq, 0x401E]).generate_state(1, np.uint64)[0] >> 1)
    if step is None:
        if cfg.auto_width:
            raise ValueError("units per step is auto: the round of a unit must be given")
        step = seq // cfg.units_per_step
    return UnitPlan(seq, step, start // dataset_size, indices, noise_seed)


def unit_noise(noise_seed: int, n: int) -> torch.Tensor:
    """Latent vectors for a unit, drawn on the CPU so every device sees the same noise."""
    gen = torch.Generator().manual_seed(noise_seed)
    return torch.randn(n, LATENT_DIM, 1, 1, generator=gen)


# --- one unit's gradients ----------------------------------------------------------


@dataclass
class UnitResult:
    grads: dict[str, torch.Tensor]  # "G.main.0.weight" -> d loss_G / d param, "D...." from loss_D
    buffers: dict[str, torch.Tensor]  # this unit's BatchNorm batch statistics (running_* names)
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.grads, **self.buffers}


def state_tensors(g: Generator, d: Discriminator) -> dict[str, torch.Tensor]:
    """Parameters and buffers of both nets, named ``G.<key>`` / ``D.<key>``."""
    out = {f"G.{k}": v for k, v in g.state_dict().items()}
    out.update({f"D.{k}": v for k, v in d.state_dict().items()})
    return out


def load_state_tensors(g: Generator, d: Discriminator, tensors: Mapping[str, torch.Tensor]) -> None:
    g_sd = {k[2:]: v for k, v in tensors.items() if k.startswith("G.")}
    d_sd = {k[2:]: v for k, v in tensors.items() if k.startswith("D.")}
    g.load_state_dict(g_sd, strict=True)
    d.load_state_dict(d_sd, strict=True)


def buffer_names(g: Generator, d: Discriminator) -> list[str]:
    return [f"G.{k}" for k, _ in g.named_buffers()] + [f"D.{k}" for k, _ in d.named_buffers()]


def gradient_spec(g: Generator, d: Discriminator) -> dict[str, tuple[tuple[int, ...], str]]:
    """What a worker's gradient payload must contain, for the codec's validation."""
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    for prefix, net in (("G.", g), ("D.", d)):
        for k, p in net.named_parameters():
            spec[prefix + k] = (tuple(p.shape), "float")
        for k, b in net.named_buffers():
            spec[prefix + k] = (tuple(b.shape), "int" if not b.is_floating_point() else "float")
    return spec


def compute_unit(
    g: Generator,
    d: Discriminator,
    images: torch.Tensor,
    noise: torch.Tensor,
    *,
    micro_batch: int | None = None,
) -> UnitResult:
    """Gradients of one unit, with the GAN math done right.

    * D's gradient comes from D's loss only: real -> 1, ``G(z).detach()`` -> 0.
    * G's gradient comes from the non-saturating loss ``D(G(z))`` -> 1, taken with
      ``torch.autograd.grad`` over G's parameters only, so nothing leaks into D.
    * BatchNorm: we return this unit's *batch statistics* (the average over its forward
      passes, under the running-statistics names) and leave the model's own buffers as they
      were, so the next unit on this version starts from the same state. The coordinator
      folds the step's statistics into the running ones (:meth:`Trainer.apply`).

    ``micro_batch`` splits the unit for small devices; the result is the sample-weighted
    mean of the chunks (BatchNorm then sees smaller batches).
    """
    n = int(images.shape[0])
    device = next(g.parameters()).device
    g_params = [p for p in g.parameters()]
    d_params = [p for p in d.parameters()]
    g_names = [f"G.{k}" for k, _ in g.named_parameters()]
    d_names = [f"D.{k}" for k, _ in d.named_parameters()]
    saved = {k: b.detach().clone() for k, b in _named_buffers(g, d).items()}
    bn_layers = [m for m in list(g.modules()) + list(d.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bn_layers]
    for m in bn_layers:
        # momentum=None makes PyTorch keep the plain average of every batch it sees.
        m.reset_running_stats()
        m.momentum = None

    sums = [torch.zeros_like(p, dtype=torch.float32) for p in g_params + d_params]
    totals = {"d_loss": 0.0, "g_loss": 0.0, "d_x": 0.0, "d_g_z": 0.0}
    g.train()
    d.train()
    chunk = n if not micro_batch or micro_batch <= 0 else micro_batch
    try:
        for start in range(0, n, chunk):
            real = images[start : start + chunk].to(device, non_blocking=True)
            z = noise[start : start + chunk].to(device, non_blocking=True)
            m = int(real.shape[0])
            ones = torch.ones(m, device=device)
            zeros = torch.zeros(m, device=device)

            fake = g(z)
            d_real = d(real)
            d_fake = d(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
            grads_d = torch.autograd.grad(loss_d, d_params)

            loss_g = F.binary_cross_entropy_with_logits(d(fake), ones)
            grads_g = torch.autograd.grad(loss_g, g_params)

            weight = m / n
            for acc, grad in zip(sums, list(grads_g) + list(grads_d)):
                acc.add_(grad.float(), alpha=weight)
            totals["d_loss"] += loss_d.item() * weight
            totals["g_loss"] += loss_g.item() * weight
            totals["d_x"] += torch.sigmoid(d_real.detach()).mean().item() * weight
            totals["d_g_z"] += torch.sigmoid(d_fake.detach()).mean().item() * weight
        buffers = {k: b.detach().to("cpu", copy=True) for k, b in _named_buffers(g, d).items()}
    finally:
        for m, momentum in zip(bn_layers, momenta):
            m.momentum = momentum
        with torch.no_grad():
            for k, b in _named_buffers(g, d).items():
                b.copy_(saved[k])

    grads = {name: t.detach().cpu() for name, t in zip(g_names + d_names, sums)}
    return UnitResult(grads, buffers, n, totals)


def run_unit(
    g: Generator,
    d: Discriminator,
    dataset: Any,
    indices: Sequence[int],
    noise_seed: int,
    *,
    micro_batch: int | None = None,
) -> tuple[UnitResult, list[int]]:
    """A whole unit as workers and ``train-local`` compute it: load, draw noise, compute.

    Unreadable images are skipped with their noise vectors, so the readable ones keep the
    noise they would have had. Returns the result and the indices that could not be read.
    """
    images, bad = dataset.load(list(indices))
    noise = unit_noise(noise_seed, len(indices))
    if bad:
        bad_set = set(bad)
        noise = noise[[i for i, idx in enumerate(indices) if idx not in bad_set]]
    if images.shape[0] == 0:
        return empty_result(g, d), bad
    return compute_unit(g, d, images, noise, micro_batch=micro_batch), bad


# --- one local unit: H alternating D/G steps -------------------------------------------


def run_local_unit(
    g: Generator,
    d: Discriminator,
    dataset: Any,
    indices: Sequence[int],
    noise_seed: int,
    cfg: TrainConfig,
    *,
    micro_batch: int | None = None,
    load_threads: int = 0,
) -> tuple[UnitResult, list[int]]:
    """A local unit: ``len(indices) / unit_size`` textbook DCGAN steps on copies of ``g`` and
    ``d`` (which stay as they are), each a D step on real and fake images and then a G step
    through the updated D, with a fresh Adam (the run's lr and betas) per unit.

    Returns the change of every parameter (``grads`` holds deltas here), the BatchNorm
    running statistics the copies ended with, the images trained on and the mean losses.
    Inner step i trains on ``indices[i*U:(i+1)*U]`` with the matching slice of the unit's
    noise; unreadable images are left out of their step, which then has fewer images.
    ``load_threads`` > 1 decodes the next batches while this one trains (GPU workers).
    """
    from ganns_async.data import load_batches

    u = cfg.unit_size
    noise = unit_noise(noise_seed, len(indices))
    lg, ld = copy.deepcopy(g), copy.deepcopy(d)
    _warm_up_batchnorm(lg)
    _warm_up_batchnorm(ld)
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(lg.parameters(), lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(ld.parameters(), lr=cfg.lr, betas=betas)
    lg.train()
    ld.train()
    bad_all: list[int] = []
    totals: dict[str, Any] = {"d_loss": 0.0, "g_loss": 0.0, "d_x": 0.0, "d_g_z": 0.0}
    n_total = 0
    batches = [list(indices[start : start + u]) for start in range(0, len(indices), u)]
    loaded = load_batches(dataset, batches, load_threads)
    try:
        for i, (real, bad) in enumerate(loaded):
            batch = batches[i]
            z = noise[i * u : i * u + len(batch)]
            if bad:
                bad_all.extend(bad)
                bad_set = set(bad)
                z = z[[j for j, idx in enumerate(batch) if idx not in bad_set]]
            m = int(real.shape[0])
            if m == 0:
                continue
            for k, v in _inner_step(lg, ld, opt_g, opt_d, real, z, micro_batch).items():
                totals[k] = totals[k] + v * m
            n_total += m
    finally:
        loaded.close()  # type: ignore[attr-defined]
    if n_total == 0:
        return empty_result(g, d), bad_all
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, before, after in (("G.", g, lg), ("D.", d, ld)):
            for (k, p0), p1 in zip(before.named_parameters(), after.parameters()):
                deltas[prefix + k] = (p1 - p0).cpu()
    buffers = {k: b.detach().to("cpu", copy=True) for k, b in _named_buffers(lg, ld).items()}
    return UnitResult(deltas, buffers, n_total, {k: float(v) / n_total for k, v in totals.items()}), bad_all


def _inner_step(g: Generator, d: Discriminator, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                images: torch.Tensor, noise: torch.Tensor, micro_batch: int | None) -> dict[str, Any]:
    """One alternating step: D on real -> 1 and G(z) -> 0, then G on D(G(z)) -> 1 through
    the D just updated (the PyTorch DCGAN tutorial's loop). ``micro_batch`` accumulates
    the step's gradients over chunks for small devices. The losses come back as tensors
    on the device: reading them once per unit keeps a GPU from waiting on the CPU."""
    device = next(g.parameters()).device
    n = int(images.shape[0])
    chunk = n if not micro_batch or micro_batch <= 0 else micro_batch
    out: dict[str, Any] = {"d_loss": 0.0, "g_loss": 0.0, "d_x": 0.0, "d_g_z": 0.0}
    opt_d.zero_grad(set_to_none=True)
    fakes: list[torch.Tensor] = []
    for start in range(0, n, chunk):
        real = images[start : start + chunk].to(device, non_blocking=True)
        z = noise[start : start + chunk].to(device, non_blocking=True)
        m = int(real.shape[0])
        fake = g(z)
        d_real = d(real)
        d_fake = d(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones(m, device=device))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros(m, device=device)))
        (loss_d * (m / n)).backward()
        fakes.append(fake)
        out["d_loss"] = out["d_loss"] + loss_d.detach() * (m / n)
        out["d_x"] = out["d_x"] + torch.sigmoid(d_real.detach()).mean() * (m / n)
        out["d_g_z"] = out["d_g_z"] + torch.sigmoid(d_fake.detach()).mean() * (m / n)
    opt_d.step()
    opt_g.zero_grad(set_to_none=True)
    g_params = list(g.parameters())
    for fake in fakes:
        m = int(fake.shape[0])
        loss_g = F.binary_cross_entropy_with_logits(d(fake), torch.ones(m, device=device))
        # Only G's gradient: D's parameters get none from G's loss.
        for p, grad in zip(g_params, torch.autograd.grad(loss_g * (m / n), g_params)):
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        out["g_loss"] = out["g_loss"] + loss_g.detach() * (m / n)
    opt_g.step()
    return out


def _warm_up_batchnorm(net: torch.nn.Module) -> None:
    """BatchNorm momentum ``max(0.1, 1 / (t + 1))`` for its t-th batch, as the coordinator
    folds statistics in exact mode: the first estimates are plain averages instead of
    dragging the initial 0 / 1 along. Counted in Python, so a GPU never has to sync."""
    for module in net.modules():
        if not isinstance(module, torch.nn.BatchNorm2d):
            continue
        base = module.momentum or 0.1
        seen = [int(module.num_batches_tracked)]

        def hook(mod: torch.nn.Module, _args: Any, base: float = base, seen: list[int] = seen) -> None:
            if mod.training:
                mod.momentum = max(base, 1.0 / (max(0, seen[0]) + 1))
                seen[0] += 1

        module.register_forward_pre_hook(hook)


def empty_result(g: Generator, d: Discriminator) -> UnitResult:
    """A unit whose images were all unreadable: contributes zero samples."""
    grads = {f"G.{k}": torch.zeros_like(p, device="cpu") for k, p in g.named_parameters()}
    grads.update({f"D.{k}": torch.zeros_like(p, device="cpu") for k, p in d.named_parameters()})
    buffers = {k: b.detach().to("cpu", copy=True) for k, b in _named_buffers(g, d).items()}
    return UnitResult(grads, buffers, 0, {})


def max_local_change(cfg: TrainConfig) -> float:
    """The largest change of one parameter that ``local_steps`` honest Adam steps can make.

    Adam's step is lr * m_hat / (sqrt(v_hat) + eps), and |m_hat / sqrt(v_hat)| is at most
    (1 - b1) / sqrt((1 - b2) * (1 - b1**2 / b2)) (about 18.3 for the model card's betas)
    whatever the gradients; doubled for slack (bias correction early on, bf16 rounding).
    """
    b1, b2 = cfg.beta1, cfg.beta2
    ratio = (1 - b1) / ((1 - b2) * max(1e-12, 1 - b1 * b1 / b2)) ** 0.5
    return 2.0 * max(1.0, ratio) * cfg.lr * cfg.local_steps


def check_result(result: UnitResult, cfg: TrainConfig) -> str | None:
    """Why a decoded unit result cannot be honest, or None. Beyond the codec's checks
    (names, shapes, finite values): BatchNorm variances are never negative, and in local
    mode no parameter moves further than the unit's Adam steps can move it."""
    for k, v in result.buffers.items():
        if k.endswith("running_var") and bool((v < 0).any()):
            return f"{k} has a negative variance"
    if cfg.local:
        limit = max_local_change(cfg)
        for k, v in result.grads.items():
            biggest = float(v.abs().max()) if v.numel() else 0.0
            if biggest > limit:
                return (f"{k} changed by {biggest:.3g}, more than {cfg.local_steps} Adam steps "
                        f"of lr {cfg.lr:g} can move it ({limit:.3g})")
    return None


def through_wire(result: UnitResult, dtype: str) -> UnitResult:
    """What the coordinator decodes from ``result`` sent as ``dtype`` (bf16 rounds floats)."""
    if dtype == "fp32":
        return result

    return UnitResult({k: _bf16_rounded(v) for k, v in result.grads.items()},
                      {k: _bf16_rounded(v) for k, v in result.buffers.items()}, result.n_samples, dict(result.metrics))


def _bf16_rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` as it arrives after a bf16 trip through the codec (round to nearest even)."""
    return t.to(torch.bfloat16).to(t.dtype) if t.is_floating_point() else t


def broadcast_copies(g: Generator, d: Discriminator, dtype: str) -> tuple[Generator, Discriminator]:
    """The models a worker loads from weights published as ``dtype``."""
    if dtype == "fp32":
        return g, d
    gb, db = copy.deepcopy(g), copy.deepcopy(d)
    with torch.no_grad():
        for t in list(gb.state_dict().values()) + list(db.state_dict().values()):
            if t.is_floating_point():
                t.copy_(_bf16_rounded(t))
    return gb, db


def _named_buffers(g: Generator, d: Discriminator) -> dict[str, torch.Tensor]:
    out = {f"G.{k}": b for k, b in g.named_buffers()}
    out.update({f"D.{k}": b for k, b in d.named_buffers()})
    return out


def split_result(tensors: Mapping[str, torch.Tensor], g: Generator, d: Discriminator,
                 n_samples: int, metrics: Mapping[str, float]) -> UnitResult:
    """Inverse of ``UnitResult.tensors()`` for a decoded payload."""
    bufs = set(buffer_names(g, d))
    return UnitResult(
        {k: v for k, v in tensors.items() if k not in bufs},
        {k: v for k, v in tensors.items() if k in bufs},
        n_samples,
        dict(metrics),
    )


# --- aggregation and the optimizer step ------------------------------------------------


class StepAccumulator:
    """Sample-weighted running mean of one step's unit results.

    Sums are kept in float64, so the order in which workers' gradients arrive does not
    change the float32 result (for the equivalence of 1 worker, N workers and train-local).
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.units: set[int] = set()
        self.n = 0
        self.workers: set[int] = set()
        self._grads: dict[str, torch.Tensor] = {}
        self._bufs: dict[str, torch.Tensor] = {}
        self._int_bufs: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, float] = {}

    def add(self, unit_id: int, result: UnitResult, worker_id: int | None = None) -> None:
        if unit_id in self.units:
            return  # seen already (e.g. re-read after a lost connection): count each unit once
        self.units.add(unit_id)
        if worker_id is not None:
            self.workers.add(worker_id)
        w = result.n_samples
        if w <= 0:
            return
        self.n += w
        for k, v in result.grads.items():
            acc = self._grads.get(k)
            if acc is None:
                self._grads[k] = v.double() * w
            else:
                acc.add_(v.double(), alpha=w)
        for k, v in result.buffers.items():
            if v.is_floating_point():
                acc = self._bufs.get(k)
                if acc is None:
                    self._bufs[k] = v.double() * w
                else:
                    acc.add_(v.double(), alpha=w)
            else:
                prev = self._int_bufs.get(k)
                self._int_bufs[k] = v.clone() if prev is None else torch.maximum(prev, v)
        for k, v in result.metrics.items():
            self._metrics[k] = self._metrics.get(k, 0.0) + float(v) * w

    def mean_grads(self) -> dict[str, torch.Tensor]:
        return {k: (v / self.n).float() for k, v in self._grads.items()}

    def mean_buffers(self) -> dict[str, torch.Tensor]:
        out = {k: (v / self.n).float() for k, v in self._bufs.items()}
        out.update(self._int_bufs)
        return out

    def metrics(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        return {k: v / self.n for k, v in self._metrics.items()}


def fold_batch_stats(net: torch.nn.Module, prefix: str, batch_stats: Mapping[str, torch.Tensor]) -> None:
    """running = (1 - m) * running + m * batch, once per optimizer step.

    ``m`` is BatchNorm's momentum (0.1) but at least ``1 / (t + 1)`` for the t-th update:
    a warm-up that makes the first estimates plain averages of what was seen, instead of
    dragging the initial 0 / 1 along for dozens of steps. Without it, ``generator.eval()``
    samples are washed out early in training (running variance far above the true one).
    """
    with torch.no_grad():
        for name, module in net.named_modules():
            if not isinstance(module, torch.nn.BatchNorm2d):
                continue
            key = f"{prefix}{name}."
            if key + "running_mean" not in batch_stats:
                continue
            t = int(module.num_batches_tracked)
            m = max(module.momentum or 0.0, 1.0 / (t + 1))
            module.running_mean.mul_(1 - m).add_(batch_stats[key + "running_mean"].to(module.running_mean), alpha=m)
            module.running_var.mul_(1 - m).add_(batch_stats[key + "running_var"].to(module.running_var), alpha=m)
            module.num_batches_tracked.add_(1)


class Trainer:
    """The coordinator's model: two Adam optimizers fed with aggregated gradients, and the
    moving average of G that samples, SWD and the checkpoint's ``generator_state_dict`` use.

    Why an average: early in DCGAN training G swings between colour modes from one step to
    the next; the average of its recent weights samples more steadily and more diversely
    (Karras et al. 2018 evaluate and publish theirs the same way). ``g`` stays the weights
    the optimizer owns, which workers compute gradients on.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        if not 0.0 <= cfg.g_ema < 1.0:
            raise ValueError(f"g_ema must be in [0, 1), got {cfg.g_ema}")
        self.cfg = cfg
        self.g, self.d = build_models(cfg.seed, cfg.feature_maps)
        self.opt_g = self._optimizer(self.g)
        self.opt_d = self._optimizer(self.d)
        self.g_ema: Generator | None = None
        self.ema_updates = 0
        self._reset_ema()

    def _optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        """Adam on averaged gradients (exact mode), or the outer SGD step on averaged
        parameter changes (local mode; Nesterov when there is momentum, as in DiLoCo)."""
        cfg = self.cfg
        if not cfg.local:
            return torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        return torch.optim.SGD(net.parameters(), lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                               nesterov=cfg.outer_momentum > 0)

    def to(self, device: str | torch.device) -> "Trainer":
        """Move the models (and the average) to ``device``; the optimizers follow their parameters."""
        self.g.to(device)
        self.d.to(device)
        if self.g_ema is not None:
            self.g_ema.to(device)
        return self

    @property
    def sampler(self) -> Generator:
        """The generator to sample from: the moving average, or ``g`` when it is off."""
        return self.g_ema if self.g_ema is not None else self.g

    def _reset_ema(self) -> None:
        self.g_ema = copy.deepcopy(self.g) if self.cfg.g_ema > 0 else None
        self.ema_updates = 0

    def _update_ema(self) -> None:
        if self.g_ema is None:
            return
        t = self.ema_updates
        beta = min(self.cfg.g_ema, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
            for avg, live in zip(self.g_ema.state_dict().values(), self.g.state_dict().values()):
                if avg.is_floating_point():
                    avg.lerp_(live, 1.0 - beta)  # BatchNorm statistics are averaged too
                else:
                    avg.copy_(live)
        self.ema_updates = t + 1

    def update(self, acc: "StepAccumulator") -> None:
        """Close a step (a round) with what its units sent, in the run's mode."""
        if acc.n <= 0:
            return
        if self.cfg.local:
            self.apply_round(acc.mean_grads(), acc.mean_buffers())
        else:
            self.apply(acc.mean_grads(), acc.mean_buffers())

    def non_finite(self) -> str | None:
        """The first parameter, buffer or optimizer state that is NaN or Inf, or None. The
        screens keep every input bounded, so this is the last line: never publish such a step."""
        for prefix, net, opt in (("G.", self.g, self.opt_g), ("D.", self.d, self.opt_d)):
            for k, t in net.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return prefix + k
            for i, state in enumerate(opt.state.values()):
                for k, t in state.items():
                    if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return f"{prefix}optimizer state {i}.{k}"
        return None

    def apply_round(self, deltas: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> None:
        """The outer step of local mode: the mean parameter change is a negative
        pseudo-gradient (FedAvg: lr 1, no momentum, lands on the mean of the workers'
        weights); BatchNorm statistics become the mean of the workers' final ones."""
        for prefix, net, opt in (("G.", self.g, self.opt_g), ("D.", self.d, self.opt_d)):
            for k, p in net.named_parameters():
                p.grad = deltas[prefix + k].to(p.device, p.dtype).neg()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, b in net.named_buffers():
                    if not b.is_floating_point():
                        # BatchNorm's batch counter (it drives the momentum warm-up) is the
                        # coordinator's own: one count per local step, never a worker's word.
                        b.add_(self.cfg.local_steps)
                        continue
                    value = buffers.get(prefix + k)
                    if value is not None:
                        b.copy_(value.to(b.device, b.dtype))
        self._update_ema()

    def apply(self, grads: Mapping[str, torch.Tensor], batch_stats: Mapping[str, torch.Tensor]) -> None:
        """One Adam step on G and D, then fold the step's BatchNorm batch statistics in."""
        for prefix, net, opt in (("G.", self.g, self.opt_g), ("D.", self.d, self.opt_d)):
            for k, p in net.named_parameters():
                p.grad = grads[prefix + k].to(p.device, p.dtype).clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if batch_stats:
                fold_batch_stats(net, prefix, batch_stats)
        self._update_ema()

    def state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self.g, self.d)

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load the training weights; the average restarts from them unless
        :meth:`load_optimizer_tensors` then brings the saved one back."""
        load_state_tensors(self.g, self.d, tensors)
        self._reset_ema()

    def optimizer_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Adam moments and G's moving average as named tensors, plus per-parameter step
        counts and the average's update count (everything --resume needs besides weights)."""
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        if self.g_ema is not None:
            tensors.update({f"{EMA_PREFIX}{k}": v for k, v in self.g_ema.state_dict().items()})
        for prefix, net, opt in (("G.", self.g, self.opt_g), ("D.", self.d, self.opt_d)):
            for k, p in net.named_parameters():
                st = opt.state.get(p)
                if not st:
                    continue
                # Adam: exp_avg, exp_avg_sq and step; the outer SGD: momentum_buffer (if any).
                for key, value in st.items():
                    if key == "step":
                        steps[prefix + k] = float(value)
                    elif isinstance(value, torch.Tensor) and value.shape == p.shape:
                        tensors[f"{prefix}{k}.{key}"] = value
        return tensors, {"steps": steps, "ema_updates": self.ema_updates}

    def load_optimizer_tensors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        steps = meta.get("steps", {})
        ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if self.g_ema is not None and ema:
            self.g_ema.load_state_dict(ema, strict=True)
            self.ema_updates = int(meta.get("ema_updates", 0))
        keys = ("momentum_buffer",) if self.cfg.local else ("exp_avg", "exp_avg_sq")
        for prefix, net, opt in (("G.", self.g, self.opt_g), ("D.", self.d, self.opt_d)):
            for k, p in net.named_parameters():
                state = {key: tensors[f"{prefix}{k}.{key}"].to(p.device).clone()
                         for key in keys if f"{prefix}{k}.{key}" in tensors}
                if prefix + k in steps:
                    state["step"] = torch.tensor(float(steps[prefix + k]))
                if not self.cfg.local and state and len(state) != 3:
                    raise ValueError(f"saved Adam state for {prefix}{k} is incomplete")
                if state:
                    opt.state[p] = state

    def checkpoint(self, *, step: int, epoch: int, images_seen: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A plain dict of tensors and numbers: loads with ``torch.load(weights_only=True)``.

        ``generator_state_dict`` is the generator to sample from (the moving average when
        it is on); ``generator_raw_state_dict`` then holds the weights ``optimizer_g_state_dict``
        belongs to, for whoever wants to train on from the file.
        """
        ckpt: dict[str, Any] = {
            "generator_state_dict": {k: v.detach().cpu().clone() for k, v in self.sampler.state_dict().items()},
            "discriminator_state_dict": {k: v.detach().cpu().clone() for k, v in self.d.state_dict().items()},
            "optimizer_g_state_dict": self.opt_g.state_dict(),
            "optimizer_d_state_dict": self.opt_d.state_dict(),
            "step": int(step),
            "epoch": int(epoch),
            "images_seen": int(images_seen),
            "config": dataclasses.asdict(self.cfg),
        }
        if self.g_ema is not None:
            ckpt["generator_raw_state_dict"] = {k: v.detach().cpu().clone() for k, v in self.g.state_dict().items()}
        if extra:
            ckpt.update(extra)
        return ckpt


def sample_noise(seed: int, n: int = 64) -> torch.Tensor:
    """The fixed noise behind every sample grid of a run, so grids are comparable."""
    return unit_noise(seed ^ 0x5A3D1E, n)


def generate(g: Generator, noise: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from ``g`` in eval mode (running BatchNorm statistics), as users sample."""
    was_training = g.training
    g.eval()
    try:
        with torch.no_grad():
            return g(noise.to(next(g.parameters()).device)).cpu()
    finally:
        g.train(was_training)
