"""BatchNorm running statistics travel with the weights, so generator.eval() samples like train()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ganns_async.local import LocalOptions, train_local
from ganns_async.model import Generator
from ganns_async.training import TrainConfig, unit_noise


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))


def _eval_matches_train(g: Generator, noise: torch.Tensor) -> tuple[bool, str]:
    with torch.no_grad():
        g.eval()
        ev = g(noise)
        g.train()
        tr = g(noise)
        g.eval()
    (m_e, s_e), (m_t, s_t) = _channel_stats(ev), _channel_stats(tr)
    ratio = s_e / s_t
    ok = bool((m_e - m_t).abs().max() <= 0.1 and ratio.min() >= 0.8 and ratio.max() <= 1.25)
    return ok, f"mean diff {(m_e - m_t).abs().max():.3f}, std ratio {ratio.min():.3f}..{ratio.max():.3f}"


@pytest.mark.slow(6)
def test_eval_mode_samples_match_train_mode(synth_zip: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        # A narrow DCGAN (--feature-maps 16): the statistics travel the same way at any width.
        cfg = TrainConfig(seed=1, unit_size=8, units_per_step=2, max_staleness=0, feature_maps=16)
        train_local(LocalOptions(data=str(synth_zip), max_steps=30, out=tmp_path, config=cfg, checkpoint_every=30))
    finally:
        torch.set_num_threads(threads)
    checkpoint = torch.load(tmp_path / "checkpoint_latest.pth", map_location="cpu")
    g = Generator(feature_maps=16)
    g.load_state_dict(checkpoint["generator_state_dict"])
    noise = unit_noise(1234, 256)
    ok, detail = _eval_matches_train(g, noise)
    assert ok, detail

    # The bug this guards against: running statistics left at their initial 0 / 1.
    for module in g.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    broken, detail = _eval_matches_train(g, noise)
    assert not broken, f"never-updated statistics should not pass: {detail}"
