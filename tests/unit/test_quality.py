"""Sample-quality metrics: ProGAN's sliced Wasserstein distance and pytorch-fid-style FID."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ganns_async import quality
from ganns_async.data import ImageDataset, write_synthetic
from ganns_async.errors import UserError
from ganns_async.model import build_models
from ganns_async.quality import (
    evaluate_checkpoint,
    evaluate_generator,
    fid_from_weights,
    frechet_distance,
    laplacian_pyramid,
    sliced_wasserstein,
)

SWD_KEYS = {"swd_64", "swd_32", "swd_16", "swd_avg"}


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """256 synthetic 64x64 faces in [-1, 1]."""
    path = tmp_path_factory.mktemp("quality") / "faces.zip"
    write_synthetic(path, 256, seed=11)
    with ImageDataset.open(path) as ds:
        images, bad = ds.load(range(len(ds)))
    assert not bad
    return images


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quality") / "small.zip"
    write_synthetic(path, 24, seed=5)
    return path


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict in the pytorch-fid file's format, with random (variance-preserving) weights."""
    net = quality.build_fid_inception()
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (torch.outer(k, k) / 256.0).view(1, 1, 5, 5).to(x.dtype)
    n, c, h, w = x.shape
    y = F.conv2d(F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect"), kernel)
    return y.view(n, c, h, w)


# --- SWD -------------------------------------------------------------------------------


def test_pyramid_levels_reconstruct_and_filter_is_binomial() -> None:
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    levels = laplacian_pyramid(x, 3)
    assert [t.shape[-1] for t in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + quality._pyr_up(rebuilt)
    assert torch.allclose(rebuilt, x, atol=1e-12)
    # the low-pass residual is blur + subsample twice with the 5x5 binomial filter
    assert torch.allclose(levels[-1], _blur(_blur(x)[:, :, ::2, ::2])[:, :, ::2, ::2], atol=1e-12)


def test_swd_keys_and_identical_sets_give_zero(faces: torch.Tensor) -> None:
    a = faces[:64]
    r = sliced_wasserstein(a, a.clone(), seed=3)
    assert set(r) == SWD_KEYS
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in r.values())


def test_swd_is_deterministic_for_a_seed(faces: torch.Tensor) -> None:
    a, b = faces[:64], faces[64:128]
    r1 = sliced_wasserstein(a, b, seed=7)
    r2 = sliced_wasserstein(a, b, seed=7)
    r3 = sliced_wasserstein(a, b, seed=8)
    assert r1 == r2
    assert r1 != r3
    assert r1["swd_avg"] == pytest.approx(np.mean([r1["swd_64"], r1["swd_32"], r1["swd_16"]]))
    for k in SWD_KEYS:  # another seed is another estimate of the same quantity
        assert r3[k] == pytest.approx(r1[k], rel=0.5)


def test_swd_same_distribution_is_much_closer_than_noise(faces: torch.Tensor) -> None:
    a, b = faces[:128], faces[128:256]
    noise = torch.rand(b.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    same = sliced_wasserstein(a, b, seed=0)
    other = sliced_wasserstein(a, noise, seed=0)
    assert all(math.isfinite(v) and v > 0 for v in same.values())
    assert other["swd_avg"] > 4 * same["swd_avg"], (same, other)
    for k in SWD_KEYS:  # the 16x16 residual is the noisiest level with 128 images
        assert other[k] > 2 * same[k], (k, same, other)


def test_swd_blur_shows_up_at_the_finest_level(faces: torch.Tensor) -> None:
    a, b = faces[:128], faces[128:256]
    base = sliced_wasserstein(a, b, seed=0)
    blurred = sliced_wasserstein(a, _blur(b), seed=0)
    up_64 = blurred["swd_64"] - base["swd_64"]
    up_16 = blurred["swd_16"] - base["swd_16"]
    assert up_64 > 10.0
    assert up_64 > 5 * abs(up_16), (base, blurred)


def test_swd_rejects_mismatched_sets(faces: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        sliced_wasserstein(faces[:8], faces[:9])
    with pytest.raises(ValueError):
        sliced_wasserstein(faces[:8, :1], faces[:8, :1])
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


# --- evaluation of generators / checkpoints ---------------------------------------------


def test_evaluate_checkpoint_fresh_generator(tmp_path: Path, small_zip: Path) -> None:
    g, _ = build_models(0)
    ckpt = tmp_path / "g.pt"
    torch.save({"generator_state_dict": g.state_dict(), "step": 0}, ckpt)
    r = evaluate_checkpoint(ckpt, str(small_zip), n=16, seed=1)  # n <= dataset: no replacement
    assert set(r) == SWD_KEYS
    assert all(math.isfinite(v) and v > 0 for v in r.values())
    assert evaluate_checkpoint(ckpt, str(small_zip), n=16, seed=1) == r
    r2 = evaluate_checkpoint(ckpt, str(small_zip), n=40, seed=1, batch=16)  # with replacement
    assert set(r2) == SWD_KEYS and all(math.isfinite(v) for v in r2.values())


def test_evaluate_checkpoint_of_a_narrow_run(tmp_path: Path, small_zip: Path) -> None:
    """A run trained with --feature-maps 16: eval reads the width from the weights."""
    g, _ = build_models(0, feature_maps=16)
    ckpt = tmp_path / "g16.pt"
    torch.save({"generator_state_dict": g.state_dict(), "step": 0}, ckpt)
    r = evaluate_checkpoint(ckpt, str(small_zip), n=16, seed=1)
    assert set(r) == SWD_KEYS and all(math.isfinite(v) and v > 0 for v in r.values())


def test_evaluate_generator_leaves_live_model_alone(small_zip: Path) -> None:
    g, _ = build_models(1)
    g.train()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with ImageDataset.open(small_zip) as ds:
        r = evaluate_generator(g, ds, n=8, seed=0)
    assert set(r) == SWD_KEYS
    assert g.training
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())


def test_unreadable_images_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_synthetic(folder, 12, seed=2)
    for name in ("000003.jpg", "000007.jpg"):
        (folder / "img_align_celeba" / name).write_bytes(b"not a jpeg")
    with ImageDataset.open(folder) as ds:
        real = quality._sample_real(ds, 12, 0, 4)
        assert real.shape == (10, 3, 64, 64)
        g, _ = build_models(0)
        r = evaluate_generator(g, ds, n=12, seed=0)
    assert all(math.isfinite(v) for v in r.values())


def test_bad_checkpoints_are_user_errors(tmp_path: Path, small_zip: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "nope.pt", str(small_zip), n=4)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="cannot load checkpoint .*: not a file written by torch.save"):
        evaluate_checkpoint(junk, str(small_zip), n=4)
    saved = tmp_path / "saved.pt"
    torch.save({"generator_state_dict": {}}, saved)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])  # a copy that stopped half-way
    with pytest.raises(UserError, match="cannot load checkpoint") as exc:
        evaluate_checkpoint(cut, str(small_zip), n=4)
    reason = str(exc.value).split(": ", 1)[1]
    assert "zip archive" in reason and "This is an internal" not in reason and len(str(exc.value)) < 300
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="generator_state_dict"):
        evaluate_checkpoint(other, str(small_zip), n=4)
    _, d = build_models(0)
    wrong = tmp_path / "wrong.pt"
    torch.save({"generator_state_dict": d.state_dict()}, wrong)
    with pytest.raises(UserError, match="do not fit"):
        evaluate_checkpoint(wrong, str(small_zip), n=4)
    g, _ = build_models(0)
    good = tmp_path / "good.pt"
    torch.save({"generator_state_dict": g.state_dict()}, good)
    with pytest.raises(UserError, match="dataset not found"):
        evaluate_checkpoint(good, str(tmp_path / "no-data.zip"), n=4)


# --- FID ---------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_forms() -> None:
    gen = torch.Generator().manual_seed(0)
    s1, s2 = torch.rand(5, generator=gen, dtype=torch.float64), torch.rand(5, generator=gen, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # general SPD pair: tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2)), eigenvalues real and positive
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    c1, c2 = a @ a.t() + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.t()
    eig = np.linalg.eigvals((c1 @ c2).numpy()).real
    want = float(torch.trace(c1) + torch.trace(c2)) - 2 * float(np.sqrt(eig).sum())
    zero = torch.zeros(6, dtype=torch.float64)
    assert frechet_distance(zero, c1, zero, c2) == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("n1, n2", [(7, 11), (2, 30), (29, 31)])
def test_fid_from_fewer_images_than_dimensions_equals_the_covariance_route(n1: int, n2: int) -> None:
    """Below the feature count the distance comes from an n1 x n2 SVD; it must equal the
    2048-style route through the (rank-deficient) covariances."""
    gen = torch.Generator().manual_seed(n1 * 100 + n2)
    mix = torch.randn(32, 32, generator=gen, dtype=torch.float64)  # correlated features
    f1 = torch.randn(n1, 32, generator=gen, dtype=torch.float64) @ mix
    f2 = torch.randn(n2, 32, generator=gen, dtype=torch.float64) @ mix * 1.3 + 0.5
    mu1, s1 = quality._gaussian(f1)
    mu2, s2 = quality._gaussian(f2)
    want = frechet_distance(mu1, s1, mu2, s2)
    # The covariance route takes square roots of round-off eigenvalues (about 1e-14 where the
    # rank runs out), which moves it by about 1e-8 of the distance.
    assert quality.frechet_distance_of_features(f1, f2) == pytest.approx(want, rel=1e-6)
    assert quality.frechet_distance_of_features(f1, f1.clone()) == pytest.approx(0.0, abs=1e-9 * want)
    # Enough images: the covariance route itself.
    many, more = (torch.randn(n, 32, generator=gen, dtype=torch.float64) for n in (40, 33))
    (m1, c1), (m2, c2) = quality._gaussian(many), quality._gaussian(more)
    assert quality.frechet_distance_of_features(many, more) == pytest.approx(frechet_distance(m1, c1, m2, c2), rel=1e-12)


def test_fid_network_has_pytorch_fid_structure() -> None:
    net = quality.build_fid_inception("meta")
    sd = net.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert "AuxLogits.fc.weight" not in sd
    assert type(net.Mixed_7c).__name__ == "FIDInceptionE_2" and net.Mixed_7c.max_pool
    assert type(net.Mixed_7b).__name__ == "FIDInceptionE_1" and not net.Mixed_7b.max_pool
    assert type(net.Mixed_5b).__name__ == "FIDInceptionA"
    assert type(net.Mixed_6e).__name__ == "FIDInceptionC"


def test_fid_loads_weights_strictly(fid_weights: Path, faces: torch.Tensor) -> None:
    a = faces[:4]  # Inception at 299x299 is the cost here: 4 images show same vs different
    b = torch.rand(a.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    same = fid_from_weights(a, a.clone(), fid_weights)
    diff = fid_from_weights(a, b, fid_weights)
    assert math.isfinite(diff) and diff > 0
    assert same == pytest.approx(0.0, abs=1e-6 * diff)
    net = quality.load_fid_inception(fid_weights)
    torch.testing.assert_close(net.state_dict()["fc.weight"], torch.load(fid_weights, weights_only=True)["fc.weight"])


def test_fid_weights_errors(tmp_path: Path, fid_weights: Path, faces: torch.Tensor) -> None:
    a = faces[:4]
    with pytest.raises(UserError, match="FID weights not found"):
        fid_from_weights(a, a, tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="cannot load FID weights"):
        fid_from_weights(a, a, junk)
    state = torch.load(fid_weights, weights_only=True)
    trimmed = tmp_path / "trimmed.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}, trimmed)
    with pytest.raises(UserError, match="missing"):
        quality.load_fid_inception(trimmed)
    tv = tmp_path / "torchvision-like.pth"
    torch.save({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, tv)
    with pytest.raises(UserError, match="wrong shape"):
        quality.load_fid_inception(tv)
    pickled = tmp_path / "pickled.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # needs unsafe unpickling: refused
    with pytest.raises(UserError, match="cannot load FID weights"):
        quality.load_fid_inception(pickled)
    # num_batches_tracked is optional, as in files written by older PyTorch
    lean = tmp_path / "lean.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, lean)
    quality.load_fid_inception(lean)
