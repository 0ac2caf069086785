"""A distributed run with --max-staleness 0 is the single-process run, to float precision:
in exact mode (--local-steps 1) and in local mode (H local steps per unit, FedAvg)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SEED, STEPS, UNIT, UNITS_PER_STEP, WIDTH, _max_diff, _spawn, _stop, _train_local, cli

LOCAL_STEPS = 3  # local mode: 3 inner steps of UNIT images per unit


def _distributed(url: str, data: Path, out: Path, workers: int, tmp: Path,
                 local_steps: int = 1, outer: tuple[str, ...] = (), wire: str = "fp32") -> dict[str, torch.Tensor]:
    common = ["--db", url, "--data", str(data)]
    procs = [_spawn("worker", *common, "--name", f"eq{i}", "--threads", "1", log=tmp / f"eq{workers}_{i}.log")
             for i in range(workers)]
    try:
        r = cli("coordinator", *common, "--no-tui", "--max-staleness", "0", "--grad-dtype", wire, "--seed", str(SEED),
                "--unit-size", str(UNIT), "--units-per-step", str(UNITS_PER_STEP), "--max-steps", str(STEPS),
                "--checkpoint-every", str(STEPS), "--eval-every", "0", "--out", str(out), "--local-steps", str(local_steps),
                "--feature-maps", str(WIDTH), *outer, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for p in procs:
            _stop(p)
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu")
    assert ckpt["step"] == STEPS
    return {**{f"G.{k}": v for k, v in ckpt["generator_raw_state_dict"].items()},
            **{f"D.{k}": v for k, v in ckpt["discriminator_state_dict"].items()},
            **{f"EMA.{k}": v for k, v in ckpt["generator_state_dict"].items()}}


@pytest.fixture
def local_state(synth_zip: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    return _train_local(synth_zip, tmp_path, feature_maps=WIDTH)


@pytest.mark.slow(5)
def test_two_workers_through_the_cli_agree_with_train_local(migrated_url: str, synth_zip: Path, tmp_path: Path,
                                                            local_state: dict[str, torch.Tensor]) -> None:
    """The real CLI in exact mode (--local-steps 1). One worker, and a worker leaving
    mid-unit, are checked in one process (tests/integration/test_class_in_one_loop.py)."""
    two = _distributed(migrated_url, synth_zip, tmp_path / "two", 2, tmp_path)
    print(f"max |diff| two-vs-local {_max_diff(two, local_state):.3g}")
    assert _max_diff(two, local_state) <= 1e-5
    # Not vacuous: training moved the weights away from their initial values.
    from ganns_async.model import build_models

    g0, _ = build_models(SEED, WIDTH)
    assert float((g0.main[0].weight.detach() - local_state["G.main.0.weight"]).abs().max()) > 1e-4


@pytest.mark.slow(11)
def test_local_steps_run_equals_its_train_local_simulation(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    """Local mode: two workers each train 3 inner steps per unit on bf16-published weights
    and send bf16 changes; the coordinator averages them with a Nesterov outer step on its
    fp32 master copy. train-local --workers 2 --local-steps 3 --grad-dtype bf16 with the
    same outer step simulates that wire and must land on the same weights."""
    outer = {"outer_lr": 0.7, "outer_momentum": 0.9}
    expected = _train_local(synth_zip, tmp_path, local_steps=LOCAL_STEPS, grad_dtype="bf16", feature_maps=WIDTH,
                            **outer)
    got = _distributed(migrated_url, synth_zip, tmp_path / "localmode", 2, tmp_path, local_steps=LOCAL_STEPS,
                       outer=("--outer-lr", "0.7", "--outer-momentum", "0.9"), wire="bf16")
    diff = _max_diff(got, expected)
    print(f"max |diff| local mode vs train-local: {diff:.3g}")
    assert diff <= 1e-5
    exact = _train_local(synth_zip, tmp_path / "exact", feature_maps=WIDTH)
    assert _max_diff(exact, expected) > 1e-3  # the two modes really differ
    fp32 = _train_local(synth_zip, tmp_path / "fp32", local_steps=LOCAL_STEPS, feature_maps=WIDTH, **outer)
    assert _max_diff(fp32, expected) > 0  # and the bf16 wire is really simulated
    ckpt = torch.load(tmp_path / "localmode" / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["images_seen"] == STEPS * UNITS_PER_STEP * LOCAL_STEPS * UNIT
    assert ckpt["config"]["local_steps"] == LOCAL_STEPS
