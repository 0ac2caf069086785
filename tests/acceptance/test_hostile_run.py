"""A synchronous run with a lying student among honest ones ends exactly where `train-local`
ends (the real CLI and tests/acceptance/hostile_worker.py in subprocesses)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    REPO, SEED, STEPS, UNIT, WIDTH, ClassLogins, Process, _fetch, _max_diff, _spawn, _spawn_script, _stop,
    _train_local,
)

HOSTILE_WORKER = REPO / "tests" / "acceptance" / "hostile_worker.py"


@pytest.mark.parametrize("attack", ["scale", "flip"])
@pytest.mark.slow(6)
def test_a_run_with_a_lying_student_ends_where_train_local_ends(
        attack: str, class_logins: ClassLogins, synth_zip: Path, tmp_path: Path) -> None:
    """fp32, exact, staleness 0: mallory (a student) tampers with every result; alice and bob
    are honest. Mallory works first and alone until a result of hers was refused; the run
    then finishes on honest work and lands exactly on train-local."""
    local = _train_local(synth_zip, tmp_path, feature_maps=WIDTH)
    data = ["--data", str(synth_zip)]
    mallory = _spawn_script(HOSTILE_WORKER, attack, class_logins.mallory, str(synth_zip), "mallory",
                            log=tmp_path / "mallory.log")
    honest: list[Process] = []
    out = tmp_path / "out"
    coord = _spawn("coordinator", "--db", class_logins.instructor, *data, "--no-tui", "--max-staleness", "0",
                   "--feature-maps", str(WIDTH),
                   "--grad-dtype", "fp32", "--seed", str(SEED), "--unit-size", str(UNIT), "--units-per-step", "2",
                   "--max-steps", str(STEPS), "--checkpoint-every", str(STEPS), "--eval-every", "0", "--out", str(out),
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
