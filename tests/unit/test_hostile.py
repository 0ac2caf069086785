"""Hostile results: each attack is refused by the coordinator's real intake path, and the
model is unharmed. (A synchronous run with a lying student among honest ones, which ends
exactly where `train-local` ends: tests/acceptance/test_hostile_run.py.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zstandard

from ganns_async import codec
from ganns_async.data import ImageDataset
from ganns_async.errors import PayloadError
from ganns_async.intake import GradientIntake
from ganns_async.screening import Norms
from ganns_async.training import StepAccumulator, TrainConfig, Trainer, plan_unit, run_unit
from helpers import SEED, UNIT, WIDTH

CFG = TrainConfig(seed=SEED, unit_size=UNIT, units_per_step=2, max_staleness=0, local_steps=1, grad_dtype="fp32",
                  feature_maps=WIDTH)  # the narrow DCGAN: the screens do not depend on the width


def _honest_units(data: Path, trainer: Trainer, count: int) -> list[tuple[bytes, int]]:
    with ImageDataset.open(data) as ds:
        out = []
        for seq in range(count):
            plan = plan_unit(CFG, len(ds), seq)
            result, _ = run_unit(trainer.g, trainer.d, ds, plan.indices, plan.noise_seed)
            blob = codec.encode_tensors(result.tensors(), meta={"n_samples": result.n_samples,
                                                                "metrics": result.metrics, "skipped": 0},
                                        float_dtype="fp32")
            out.append((blob, result.n_samples))
    return out


def _forge(blob: bytes, change: Callable[[dict[str, torch.Tensor], dict], None]) -> bytes:
    tensors, meta = codec.decode_tensors(blob)
    change(tensors, meta)
    return codec.encode_tensors(tensors, meta=meta, float_dtype="fp32")


def _scale(f: float) -> Callable[[dict[str, torch.Tensor], dict], None]:
    def change(t: dict[str, torch.Tensor], _m: dict) -> None:
        for k in t:
            if t[k].is_floating_point() and not k.endswith(("running_mean", "running_var")):
                t[k] = t[k] * f
    return change


def _poke(name_end: str, value: float) -> Callable[[dict[str, torch.Tensor], dict], None]:
    def change(t: dict[str, torch.Tensor], _m: dict) -> None:
        k = next(k for k in t if k.endswith(name_end))
        t[k] = t[k].clone()
        t[k].view(-1)[0] = value
    return change


def _meta(**fields: object) -> Callable[[dict[str, torch.Tensor], dict], None]:
    def change(_t: dict[str, torch.Tensor], m: dict) -> None:
        m.update(fields)
    return change


ATTACKS: dict[str, Callable[[bytes, int], tuple[bytes, int]]] = {
    "scaled x1e6": lambda b, n: (_forge(b, _scale(1e6)), n),
    "sign flip x1e3": lambda b, n: (_forge(b, _scale(-1e3)), n),
    "+3e38": lambda b, n: (_forge(b, _poke("main.0.weight", 3e38)), n),
    "-3e38": lambda b, n: (_forge(b, _poke("main.2.weight", -3e38)), n),
    "negative variance": lambda b, n: (_forge(b, _poke("running_var", -1e6)), n),
    "huge variance": lambda b, n: (_forge(b, _poke("running_var", 1e9)), n),
    "huge mean": lambda b, n: (_forge(b, _poke("running_mean", 1e7)), n),
    "lying n_samples (row)": lambda b, n: (b, n * 2),
    "lying n_samples (meta)": lambda b, n: (_forge(b, _meta(n_samples=n * 2)), n * 2 + 1),
    "more samples than the unit": lambda b, n: (_forge(b, _meta(n_samples=CFG.images_per_unit + 1)),
                                                CFG.images_per_unit + 1),
    "empty unit": lambda b, n: (_forge(b, _meta(n_samples=0)), 0),
    "no tensors": lambda b, n: (codec.encode_tensors({}, meta={"n_samples": n, "metrics": {}, "skipped": 0}), n),
    "amplification bomb": lambda b, n: (zstandard.ZstdCompressor(level=3).compress(b"\0" * (256 << 20)), n),
    "truncated": lambda b, n: (b[: len(b) // 2], n),
    "metrics not numbers": lambda b, n: (_forge(b, _meta(metrics={"d_loss": "x"})), n),
    "meta with an extra key": lambda b, n: (_forge(b, _meta(note="x" * 60000)), n),
    "meta without skipped": lambda b, n: (_forge(b, lambda _t, m: m.pop("skipped")), n),
    "meta metrics of 17 keys": lambda b, n: (_forge(b, _meta(metrics={f"m{i}": 1.0 for i in range(17)})), n),
    "meta metric Inf": lambda b, n: (_forge(b, _meta(metrics={"d_loss": float("inf")})), n),
}


@pytest.fixture(scope="module")
def warmed(synth_zip: Path) -> tuple[GradientIntake, Trainer, list[tuple[bytes, int]]]:
    trainer = Trainer(CFG)
    intake = GradientIntake(None, None, run_id=0, trainer=trainer, config=CFG,  # type: ignore[arg-type]
                            fold_thread=None, event=None)  # type: ignore[arg-type]
    honest = _honest_units(synth_zip, trainer, 6)
    for blob, n in honest[:5]:
        _result, norms = intake._decode(blob, n)
        intake.screen.accept(norms)
    return intake, trainer, honest


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_each_hostile_result_is_refused_and_the_model_unharmed(
        attack: str, warmed: tuple[GradientIntake, Trainer, list[tuple[bytes, int]]]) -> None:
    intake, trainer, honest = warmed
    before = {k: v.clone() for k, v in trainer.state().items()}
    blob, n = ATTACKS[attack](*honest[5])
    started = time.perf_counter()
    with pytest.raises(PayloadError):
        intake._decode(blob, n)
    assert time.perf_counter() - started < 30  # a bomb is refused, not decoded for minutes
    # The honest unit itself still passes, and an Adam step on honest work alone stays finite.
    result, norms = intake._decode(*honest[5])
    assert isinstance(norms, Norms)
    after = trainer.state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    acc = StepAccumulator(0)
    acc.add(1, result)
    probe = Trainer(CFG)
    probe.update(acc)
    opt, _ = probe.optimizer_tensors()
    assert all(bool(torch.isfinite(t).all()) for t in [*opt.values(), *probe.state().values()]
               if t.is_floating_point())


def test_a_non_finite_step_is_named_before_it_could_be_published() -> None:
    trainer = Trainer(CFG)
    assert trainer.non_finite() is None
    acc = StepAccumulator(0)
    zeros = {f"G.{k}": torch.zeros_like(p) for k, p in trainer.g.named_parameters()}
    zeros.update({f"D.{k}": torch.zeros_like(p) for k, p in trainer.d.named_parameters()})
    zeros["D.main.0.weight"] = torch.full_like(zeros["D.main.0.weight"], 3e38)  # what the screens refuse
    from ganns_async.training import UnitResult, _named_buffers

    acc.add(1, UnitResult(zeros, {k: b.clone() for k, b in _named_buffers(trainer.g, trainer.d).items()}, 16, {}))
    trainer.update(acc)
    assert trainer.non_finite() is not None and "D." in trainer.non_finite()  # type: ignore[operator]
