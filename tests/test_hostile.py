"""Hostile results: each attack is refused by the coordinator's real intake path, and the
model is unharmed; a synchronous run with a lying student among honest ones ends exactly
where `train-local` ends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zstandard

from conftest import REPO, ClassLogins
from ganns_async import codec
from ganns_async.data import ImageDataset
from ganns_async.errors import PayloadError
from ganns_async.intake import GradientIntake
from ganns_async.screening import Norms
from ganns_async.training import StepAccumulator, TrainConfig, Trainer, plan_unit, run_unit
from test_end_to_end import _fetch, _spawn, _stop
from test_equivalence import SEED, STEPS, UNIT, _max_diff, _train_local

CFG = TrainConfig(seed=SEED, unit_size=UNIT, units_per_step=2, max_staleness=0, local_steps=1, grad_dtype="fp32")


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


@pytest.mark.parametrize("attack", ["scale", "flip"])
def test_a_run_with_a_lying_student_ends_where_train_local_ends(
        attack: str, class_logins: ClassLogins, synth_zip: Path, tmp_path: Path) -> None:
    """fp32, exact, staleness 0: mallory (a student) tampers with every result; alice and bob
    are honest. Mallory works first and alone until a result of hers was refused; the run
    then finishes on honest work and lands exactly on train-local."""
    local = _train_local(synth_zip, tmp_path)
    data = ["--data", str(synth_zip)]
    mallory = subprocess.Popen([sys.executable, str(REPO / "tests" / "hostile_worker.py"), attack,
                                class_logins.mallory, str(synth_zip), "mallory"],
                               stdout=open(tmp_path / "mallory.log", "wb"), stderr=subprocess.STDOUT, cwd=REPO)  # noqa: SIM115
    honest: list[subprocess.Popen[bytes]] = []
    out = tmp_path / "out"
    coord = _spawn("coordinator", "--db", class_logins.instructor, *data, "--no-tui", "--max-staleness", "0",
                   "--grad-dtype", "fp32", "--seed", str(SEED), "--unit-size", str(UNIT), "--units-per-step", "2",
                   "--max-steps", str(STEPS), "--checkpoint-every", str(STEPS), "--out", str(out),
                   "--local-steps", "1", log=tmp_path / "coord.log")
    try:
        deadline = time.monotonic() + 120
        while not asyncio.run(_fetch(class_logins.admin, "SELECT 1 FROM rejections LIMIT 1")):
            assert time.monotonic() < deadline, (tmp_path / "mallory.log").read_text()[-3000:]
            assert coord.poll() is None, (tmp_path / "coord.log").read_text()[-3000:]
            time.sleep(0.5)  # test code, watching for the first refusal
        honest = [_spawn("worker", "--db", url, *data, "--name", who, "--threads", "1", log=tmp_path / f"{who}.log")
                  for who, url in (("alice", class_logins.alice), ("bob", class_logins.bob))]
        assert coord.wait(300) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        for p in [*honest, mallory]:
            _stop(p)
        _stop(coord)
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu")
    distributed = {**{f"G.{k}": v for k, v in ckpt["generator_raw_state_dict"].items()},
                   **{f"D.{k}": v for k, v in ckpt["discriminator_state_dict"].items()},
                   **{f"EMA.{k}": v for k, v in ckpt["generator_state_dict"].items()}}
    assert _max_diff(distributed, local) <= 1e-5
    refused = asyncio.run(_fetch(class_logins.admin, "SELECT w.name, r.reason FROM rejections r "
                                                     "JOIN workers w ON w.id = r.worker_id"))
    assert refused and all(r["name"].startswith(class_logins.names[3]) for r in refused), refused
    # Equal to train-local means every unit counted, and each was computed honestly.


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
