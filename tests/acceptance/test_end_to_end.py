"""The real CLI in subprocesses: coordinator and workers train through PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ganns_async.demo import _stop_all
from helpers import PY, REPO, WIDTH, ClassLogins, _fetch, _spawn, _stop, _wait_for_worker_state, cli

def _model_card_generator(checkpoint_path: Path) -> nn.Module:
    """The model card's own loading snippet, verbatim except for the download."""
    checkpoint = torch.load(checkpoint_path, map_location='cpu')

    class Generator(nn.Module):
        def __init__(self, latent_dim=100, num_channels=3, feature_maps=64):
            super(Generator, self).__init__()
            self.main = nn.Sequential(
                nn.ConvTranspose2d(latent_dim, feature_maps * 8, 4, 1, 0, bias=False),
                nn.BatchNorm2d(feature_maps * 8),
                nn.ReLU(True),
                nn.ConvTranspose2d(feature_maps * 8, feature_maps * 4, 4, 2, 1, bias=False),
                nn.BatchNorm2d(feature_maps * 4),
                nn.ReLU(True),
                nn.ConvTranspose2d(feature_maps * 4, feature_maps * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(feature_maps * 2),
                nn.ReLU(True),
                nn.ConvTranspose2d(feature_maps * 2, feature_maps, 4, 2, 1, bias=False),
                nn.BatchNorm2d(feature_maps),
                nn.ReLU(True),
                nn.ConvTranspose2d(feature_maps, num_channels, 4, 2, 1, bias=False),
                nn.Tanh()
            )

        def forward(self, z):
            return self.main(z)

    generator = Generator()
    generator.load_state_dict(checkpoint['generator_state_dict'])
    generator.eval()
    return generator


@pytest.mark.slow(21)
def test_coordinator_and_two_workers_train_and_checkpoint_loads(class_logins: ClassLogins, synth_zip: Path,
                                                               tmp_path: Path) -> None:
    """As in a class: the instructor's login runs the coordinator, two students' logins the workers."""
    migrated_url = class_logins.admin
    out = tmp_path / "out"
    data = ["--data", str(synth_zip)]
    students = [("w0", class_logins.alice, class_logins.names[1]), ("w1", class_logins.bob, class_logins.names[2])]
    # Workers start first: they wait for a run and are woken by its notification.
    workers = [
        _spawn("worker", "--db", url, *data, "--name", label, "--threads", "1", "--no-tui", log=tmp_path / f"{label}.log")
        for label, url, _login in students
    ]
    try:
        for label, _url, login in students:
            # The server names a student's worker after the login. With no run yet a worker
            # reports `waiting` (a freshly registered row says `idle` only until its first write).
            asyncio.run(_wait_for_worker_state(migrated_url, f"{login}/{label}", "waiting"))
        coord = cli("coordinator", "--db", class_logins.instructor, *data, "--no-tui", "--max-steps", "3", "--unit-size", "8", "--local-steps", "1", "--max-staleness", "1",
                    "--units-per-step", "2", "--checkpoint-every", "1", "--eval-n", "64", "--out", str(out),
                    timeout=300)
        assert coord.returncode == 0, coord.stdout + coord.stderr
    finally:
        codes = [_stop(w) for w in workers]
    assert codes == [0, 0], [p.read_text() for p in tmp_path.glob("w*.log")]

    generator = _model_card_generator(out / "checkpoint_latest.pth")
    with torch.no_grad():
        noise = torch.randn(16, 100, 1, 1)
        fake_images = generator(noise)
    assert fake_images.shape == (16, 3, 64, 64)
    assert fake_images.min() >= -1 and fake_images.max() <= 1
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu")
    assert ckpt["step"] == 3 and set(ckpt) >= {"discriminator_state_dict", "optimizer_g_state_dict",
                                                "optimizer_d_state_dict", "epoch"}
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "step_000001.png", "step_000002.png", "step_000003.png"]

    rows = asyncio.run(_fetch(migrated_url, "SELECT status, step, images_seen FROM runs"))
    assert [tuple(r) for r in rows] == [("done", 3, 48)]
    metrics = asyncio.run(_fetch(migrated_url, "SELECT step, units, images FROM metrics WHERE step >= 1 ORDER BY step"))
    assert [tuple(r) for r in metrics] == [(1, 2, 16), (2, 2, 16), (3, 2, 16)]
    # Quality is recorded at step 0 (the baseline) and at the end, and plotted.
    swd = asyncio.run(_fetch(migrated_url, "SELECT step, swd FROM metrics WHERE swd IS NOT NULL ORDER BY step"))
    assert [r["step"] for r in swd] == [0, 3] and all(r["swd"] > 0 for r in swd)
    assert (out / "metrics.png").stat().st_size > 1000
    evaluated = cli("eval", "--checkpoint", str(out / "checkpoint_latest.pth"), "--data", str(synth_zip), "--n", "32")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "swd_avg" in evaluated.stdout and "swd_16" in evaluated.stdout and "fid" not in evaluated.stdout
    contributors = asyncio.run(_fetch(migrated_url, "SELECT name, units_done, state FROM workers ORDER BY name"))
    # Six units, and copies of each worker's first results checked by the other (replication).
    assert sum(r["units_done"] for r in contributors) >= 6
    assert all(r["state"] == "offline" for r in contributors)
    assert asyncio.run(_fetch(migrated_url, "SELECT reason FROM rejections")) == []  # honest work all counted
    # Nothing piles up: gradients are consumed, old versions pruned.
    assert asyncio.run(_fetch(migrated_url, "SELECT id FROM gradients")) == []
    versions = asyncio.run(_fetch(migrated_url, "SELECT version FROM weights ORDER BY version"))
    # Staleness 1 keeps the newest two versions; the last (3) also holds the saved Adam state.
    assert [r["version"] for r in versions] == [2, 3]
    states = asyncio.run(_fetch(migrated_url, "SELECT version FROM weights WHERE optimizer IS NOT NULL"))
    assert [r["version"] for r in states] == [3]


@pytest.mark.slow(24)
def test_worker_killed_mid_unit_does_not_lose_the_run(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    # Units of 8 x 32 images: long enough (about a second at this width) to be killed in.
    coord = _spawn("coordinator", "--local-steps", "8", *common, "--max-steps", "1", "--unit-size", "32", "--units-per-step", "2",
                   "--feature-maps", str(WIDTH), "--sweep-seconds", "1", "--out", str(out), log=tmp_path / "coord.log")
    victim = _spawn("worker", *common, "--name", "victim", "--threads", "1", "--lease-seconds", "3",
                    "--heartbeat-seconds", "1", log=tmp_path / "victim.log")
    survivor = None
    try:
        asyncio.run(_wait_for_worker_state(migrated_url, "victim", "computing"))
        victim.kill()  # SIGKILL: no cleanup, its lease must run out
        victim.wait(10)
        survivor = _spawn("worker", *common, "--name", "survivor", "--threads", "1", log=tmp_path / "survivor.log")
        assert coord.wait(240) == 0, (tmp_path / "coord.log").read_text()
    finally:
        if survivor is not None:
            assert _stop(survivor) == 0
        _stop(coord)
    assert (out / "checkpoint_latest.pth").exists()
    events = asyncio.run(_fetch(migrated_url, "SELECT kind, message FROM events WHERE kind = 'requeue'"))
    assert events and "victim" in events[0]["message"], (tmp_path / "coord.log").read_text()
    done = asyncio.run(_fetch(migrated_url, "SELECT status, step FROM runs"))
    assert [tuple(r) for r in done] == [("done", 1)]


@pytest.mark.parametrize("how", ["ctrl-c", "the demo, started in the background"])
def test_ctrl_c_gives_the_unit_back_at_once(migrated_url: str, synth_zip: Path, tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGINT), and the demo stopping its workers: a demo started in the background
    (``ganns-async demo &``) starts them with SIGINT ignored, so it stops them with SIGTERM,
    which a worker takes like Ctrl-C."""
    common = ["--db", migrated_url, "--data", str(synth_zip)]
    coord = _spawn("coordinator", "--local-steps", "2", *common, "--max-steps", "5", "--unit-size", "64", "--units-per-step", "1",
                   "--eval-every", "0", "--out", str(tmp_path / "out"), log=tmp_path / "coord.log")
    worker_args = ["worker", *common, "--name", "leaver", "--threads", "1", "--lease-seconds", "600"]
    if how == "ctrl-c":
        worker = _spawn(*worker_args, log=tmp_path / "worker.log")
    else:
        worker = subprocess.Popen([*PY, *worker_args, "--no-tui"], stdout=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT, cwd=REPO,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        asyncio.run(_wait_for_worker_state(migrated_url, "leaver", "computing"))
        claimed = asyncio.run(_fetch(migrated_url, "SELECT id FROM work_units WHERE state = 'claimed'"))
        assert len(claimed) == 1
        if how == "ctrl-c":
            assert _stop(worker, signal.SIGINT) == 0, (tmp_path / "worker.log").read_text()
        else:
            _stop_all([("leaver", worker)])
            assert worker.returncode == 0, (tmp_path / "worker.log").read_text()
        # The lease was 10 minutes: the unit is pending now only because the worker released it.
        unit = asyncio.run(_fetch(migrated_url, "SELECT state, worker_id FROM work_units WHERE id = $1",
                                  claimed[0]["id"]))
        assert [tuple(r) for r in unit] == [("pending", None)]
        state = asyncio.run(_fetch(migrated_url, "SELECT state FROM workers WHERE name = 'leaver'"))
        assert state[0]["state"] == "offline"
    finally:
        _stop(coord)
        _stop(worker)


def test_worker_with_other_data_refuses_to_join(migrated_url: str, synth_zip: Path, tmp_path: Path) -> None:
    from ganns_async.data import write_synthetic

    other = write_synthetic(tmp_path / "other.zip", 40, seed=99)
    coord = _spawn("coordinator", "--local-steps", "2", "--db", migrated_url, "--data", str(synth_zip), "--max-steps", "1",
                   "--eval-every", "0", "--out", str(tmp_path / "out"), log=tmp_path / "coord.log")
    try:
        # The worker waits for the run (woken by its notification), then refuses it.
        r = cli("worker", "--db", migrated_url, "--data", str(other), "--name", "stranger", "--no-tui", timeout=180)
    finally:
        _stop(coord)
    assert r.returncode != 0
    assert r.stderr.startswith("error: refusing to join run") and "fingerprint" in r.stderr
    assert "Traceback" not in r.stderr
    state = asyncio.run(_fetch(migrated_url, "SELECT state FROM workers WHERE name = 'stranger'"))
    assert state[0]["state"] == "offline"


@pytest.mark.slow(26)
def test_demo_runs_end_to_end_on_its_own_embedded_postgres(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # The model card's DCGAN (the demo's default width), on a small dataset in small units.
    r = cli("demo", "--max-steps", "2", "--local-steps", "2", "--unit-size", "8", "--synthetic-count", "64",
            "--out", str(out), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[demo] checkpoint:" in r.stdout and "[demo] quality:      SWD x1e3" in r.stdout
    ckpt = torch.load(out / "checkpoint_latest.pth", map_location="cpu")
    assert ckpt["step"] == 2
    assert (out / "metrics.png").exists() and list((out / "samples").glob("step_*.png"))
    assert "Traceback" not in r.stdout + r.stderr
