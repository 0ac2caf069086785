"""Sample-quality metrics: sliced Wasserstein distance (SWD) and, with user-supplied
Inception weights, the Fréchet Inception Distance (FID).

SWD follows Karras et al. 2018 ("Progressive Growing of GANs", appendix D, and their
``metrics/sliced_wasserstein.py``):

* each image set is turned into a Laplacian pyramid (5-tap binomial filter
  ``[1, 4, 6, 4, 1] / 16``, separable, mirror borders as ``scipy.ndimage`` ``mode='mirror'``,
  i.e. ``torch`` ``'reflect'`` padding) with levels down to 16x16; for 64x64 images the
  levels are 64 and 32 (band-pass) and 16 (the low-pass residual);
* 128 random 7x7x3 neighbourhoods per image and level are the descriptors;
* each set's descriptors are normalised per colour channel by that set's own mean and
  (population) standard deviation;
* the distance is the sliced Wasserstein distance over ``4 x 128`` random unit directions
  (project, sort, mean absolute difference), reported per level and averaged, times 1e3
  (ProGAN's ``SWDx1e3_*`` numbers).

Images come in as ``[-1, 1]`` tensors and are quantised to the ``[0, 255]`` integer grid
ProGAN feeds its metric (its fakes pass through ``uint8``). Because every level is linear in
the image and the per-channel normalisation removes any affine change of intensity, the
scale itself does not affect the result; only the quantisation (a tiny effect) does.

Everything random (neighbourhood positions, directions) comes from CPU ``torch.Generator``
streams derived from ``seed``, so the result is a deterministic function of the inputs
and the seed. Both sets use the *same* neighbourhood positions (common random numbers:
lower variance, and identical sets give exactly 0), while ProGAN drew them independently.

FID follows pytorch-fid (Seitzer): its TF-ported Inception (torchvision ``Inception3`` with
the ``FIDInceptionA/C/E_1/E_2`` blocks), pool3 features (2048-d), bilinear resize to
299x299 without corner alignment, and the Fréchet distance between the feature Gaussians.
The weights are never downloaded: pass the ``pt_inception-2015-12-05-6726825d.pth`` file.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ganns_async.errors import UserError
from ganns_async.model import FEATURE_MAPS, Generator, feature_maps_of

__all__ = [
    "sliced_wasserstein",
    "laplacian_pyramid",
    "build_fid_inception",
    "load_fid_inception",
    "inception_features",
    "frechet_distance",
    "frechet_distance_of_features",
    "fid_from_weights",
    "evaluate_generator",
    "evaluate_checkpoint",
]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"

# ProGAN's SWD settings.
NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16

_MASK64 = (1 << 64) - 1
_IMAGE_CHUNK = 256  # images per pyramid / descriptor chunk
_DIR_CHUNK = 32  # directions projected and sorted at a time


def _derived_seed(seed: int, tag: int) -> int:
    """An independent 63-bit seed for one random stream, as training.py derives its own."""
    return int(np.random.SeedSequence([seed & _MASK64, tag]).generate_state(1, np.uint64)[0] >> 1)


def _cpu_generator(seed: int, tag: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, tag))


# ---------------------------------------------------------------------------------------
# Laplacian pyramid (ProGAN's pyr_down / pyr_up, which match cv2.pyrDown / cv2.pyrUp).


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5x5 binomial filter ``[1, 4, 6, 4, 1] / 16`` with mirror borders (scipy's
    ``mode='mirror'``, torch's ``'reflect'``), on (n, c, h, w); shifted adds, no conv."""
    n, c, h, w = x.shape
    p = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect").view(n * c, h + 4, w + 4)
    t = p[:, :, 0:w] + p[:, :, 4:w + 4]
    t += 4.0 * (p[:, :, 1:w + 1] + p[:, :, 3:w + 3])
    t += 6.0 * p[:, :, 2:w + 2]
    y = t[:, 0:h] + t[:, 4:h + 4]
    y += 4.0 * (t[:, 1:h + 1] + t[:, 3:h + 3])
    y += 6.0 * t[:, 2:h + 2]
    y *= gain / 256.0
    return y.view(n, c, h, w)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _pyr_up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    z = x.new_zeros((n, c, 2 * h, 2 * w))
    z[:, :, ::2, ::2] = x
    return _blur(z, gain=4.0)


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """``num_levels`` levels, finest first: band-pass levels, then the low-pass residual."""
    pyramid = [images]
    for _ in range(1, num_levels):
        down = _pyr_down(pyramid[-1])
        pyramid[-1] = pyramid[-1] - _pyr_up(down)
        pyramid.append(down)
    return pyramid


def _resolutions(size: int) -> list[int]:
    res, out = size, []
    while res >= MIN_RESOLUTION:
        out.append(res)
        res //= 2
    return out


def _to_255(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats onto ProGAN's uint8 grid (kept as float32 in [0, 255])."""
    return torch.round((x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5)


def _check_images(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an (n, 3, h, w) image tensor, got {shape}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} holds no images")


# ---------------------------------------------------------------------------------------
# Sliced Wasserstein distance.


def _descriptors(images: torch.Tensor, level: int, num_levels: int,
                 ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Normalised (N, 7*7*3) descriptors of one pyramid level of one image set.

    ``ys``/``xs`` hold the neighbourhood centres, ``NHOODS_PER_IMAGE`` per image in order.
    Components are laid out (y, x, channel) rather than ProGAN's (channel, y, x); the
    random directions are isotropic, so the layout does not change the distribution of
    the result. The pyramid is built chunk by chunk so memory stays bounded.
    """
    n = images.shape[0]
    half = NHOOD_SIZE // 2
    offsets = torch.arange(-half, half + 1)
    desc = torch.empty(n * NHOODS_PER_IMAGE, NHOOD_SIZE * NHOOD_SIZE, 3)
    for a in range(0, n, _IMAGE_CHUNK):
        chunk = _to_255(images[a:a + _IMAGE_CHUNK])
        # level + 2 levels make ``level`` band-pass, unless it is the last (low-pass) one.
        lvl = laplacian_pyramid(chunk, min(level + 2, num_levels))[level]
        m, _, size, _ = lvl.shape
        rows = slice(a * NHOODS_PER_IMAGE, (a + m) * NHOODS_PER_IMAGE)
        pixels = lvl.permute(0, 2, 3, 1).reshape(-1, 3)  # (m*size*size, 3)
        base = torch.arange(m).repeat_interleave(NHOODS_PER_IMAGE) * (size * size)
        yy = (ys[rows].view(-1, 1) + offsets) * size
        xx = xs[rows].view(-1, 1) + offsets
        lin = (base.view(-1, 1, 1) + yy.view(-1, NHOOD_SIZE, 1) + xx.view(-1, 1, NHOOD_SIZE)).view(-1)
        desc[rows] = pixels.index_select(0, lin).view(-1, NHOOD_SIZE * NHOOD_SIZE, 3)
    # ProGAN's finalize_descriptors: per-channel mean / population std over this set.
    var, mean = torch.var_mean(desc.view(-1, 3), dim=0, correction=0)  # no large temporaries
    std = var.sqrt()
    desc -= mean
    desc /= torch.where(std > 0, std, torch.ones_like(std))
    return desc.view(desc.shape[0], -1)


def _sorted_abs_diff_sum(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor) -> float:
    """Sum over directions and ranks of |sorted(a @ d) - sorted(b @ d)|."""
    pa = (dirs.t() @ a.t()).numpy()  # (directions, N), rows contiguous
    pb = (dirs.t() @ b.t()).numpy()
    pa.sort(axis=1)  # numpy's SIMD sort, several times faster than torch.sort on CPU
    pb.sort(axis=1)
    pa -= pb
    np.abs(pa, out=pa)
    return float(pa.sum(dtype=np.float64))


def _workers() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, 8))


def _swd_1level(a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> float:
    """Mean |sorted(a @ d) - sorted(b @ d)| over DIR_REPEATS x DIRS_PER_REPEAT unit directions
    (ProGAN averages per repeat, then over repeats: the same mean for equal-sized repeats)."""
    dims = a.shape[1]
    dirs = torch.randn(DIR_REPEATS, dims, DIRS_PER_REPEAT, generator=gen, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=1, keepdim=True)).float()
    dirs = dirs.permute(1, 0, 2).reshape(dims, DIR_REPEATS * DIRS_PER_REPEAT)
    chunks = [dirs[:, c:c + _DIR_CHUNK].contiguous() for c in range(0, dirs.shape[1], _DIR_CHUNK)]
    workers = _workers()
    if workers == 1:
        total = sum(_sorted_abs_diff_sum(a, b, d) for d in chunks)
    else:
        # numpy's sort releases the GIL; the projections are small matmuls.
        with ThreadPoolExecutor(workers, thread_name_prefix="swd") as pool:
            total = sum(pool.map(lambda d: _sorted_abs_diff_sum(a, b, d), chunks))
    return total / (a.shape[0] * dirs.shape[1])


def sliced_wasserstein(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """ProGAN's SWD between two equally sized sets of [-1, 1] images, times 1e3.

    Returns ``{"swd_64": ..., "swd_32": ..., "swd_16": ..., "swd_avg": ...}`` for 64x64
    images (one key per pyramid level, finest first, down to 16x16; ``swd_avg`` is their
    mean). Deterministic for a given ``seed``; identical sets give exactly 0.
    """
    _check_images("real", real)
    _check_images("fake", fake)
    if real.shape != fake.shape:
        raise ValueError(f"real and fake image sets must have the same shape, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    n, _, h, w = real.shape
    if h != w or h < MIN_RESOLUTION:
        raise ValueError(f"SWD needs square images of at least {MIN_RESOLUTION}x{MIN_RESOLUTION}, got {h}x{w}")
    resolutions = _resolutions(h)
    half = NHOOD_SIZE // 2
    pos_gen = _cpu_generator(seed, 0x5DA7C4)
    dir_gen = _cpu_generator(seed, 0xD1EC7)
    result: dict[str, float] = {}
    with torch.no_grad():
        for level, res in enumerate(resolutions):
            size = h >> level
            count = n * NHOODS_PER_IMAGE
            ys = torch.randint(half, size - half, (count,), generator=pos_gen)
            xs = torch.randint(half, size - half, (count,), generator=pos_gen)
            a = _descriptors(real, level, len(resolutions), ys, xs)
            b = _descriptors(fake, level, len(resolutions), ys, xs)
            result[f"swd_{res}"] = _swd_1level(a, b, dir_gen) * 1e3
            del a, b
    result["swd_avg"] = float(np.mean([result[f"swd_{r}"] for r in resolutions]))
    return result


# ---------------------------------------------------------------------------------------
# FID with pytorch-fid's Inception.


def _fid_blocks() -> tuple[type[nn.Module], ...]:
    from torchvision.models import inception as tvi

    class FIDInceptionA(tvi.InceptionA):
        """InceptionA whose average pool ignores the zero padding (as TensorFlow's)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b5, b3, bp], 1)

    class FIDInceptionC(tvi.InceptionC):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b7, bd, bp], 1)

    class _FIDInceptionE(tvi.InceptionE):
        max_pool = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.max_pool:  # the FID graph's last block max-pools (a quirk kept for comparability)
                pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)

    class FIDInceptionE_1(_FIDInceptionE):
        max_pool = False

    class FIDInceptionE_2(_FIDInceptionE):
        max_pool = True

    return FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2


def build_fid_inception(device: str | torch.device | None = None) -> nn.Module:
    """pytorch-fid's FID Inception (torchvision Inception3, 1008 classes, FID blocks), with
    untrained weights, in eval mode. Its ``state_dict`` has the keys of the pytorch-fid file.
    ``device="meta"`` builds the skeleton only (for loading weights with ``assign=True``)."""
    from torchvision.models import inception_v3

    if device is not None:
        with torch.device(device):
            return build_fid_inception()
    A, C, E1, E2 = _fid_blocks()
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = A(192, pool_features=32)
    net.Mixed_5c = A(256, pool_features=64)
    net.Mixed_5d = A(288, pool_features=64)
    net.Mixed_6b = C(768, channels_7x7=128)
    net.Mixed_6c = C(768, channels_7x7=160)
    net.Mixed_6d = C(768, channels_7x7=160)
    net.Mixed_6e = C(768, channels_7x7=192)
    net.Mixed_7b = E1(1280)
    net.Mixed_7c = E2(2048)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def why_load_failed(path: Path, exc: BaseException) -> str:
    """One short reason why ``torch.load(path)`` raised ``exc``. A file that torch.save did
    not write (neither its zip archive nor its older pickle format) makes torch.load raise
    whatever the unpickler tripped on first, such as ``KeyError: 174812789``: say what the
    file is not instead."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        return err.strerror or str(err)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "not a file written by torch.save"
    text = str(exc).strip()
    line = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""  # its first sentence
    if len(line) > 120:
        line = line[:117] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def load_fid_inception(weights_path: str | Path) -> nn.Module:
    """The FID Inception with the pytorch-fid weights file loaded strictly; UserError if unusable."""
    path = Path(weights_path).expanduser()
    hint = f"pass the pytorch-fid weights file {FID_WEIGHTS_NAME}"
    if not path.is_file():
        raise UserError(f"FID weights not found: {path} ({hint})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or needs unsafe unpickling
        raise UserError(f"cannot load FID weights {path}: {why_load_failed(path, exc)} ({hint})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"FID weights {path} are not a state dict of tensors ({hint})")
    net = build_fid_inception("meta")  # no time spent initialising weights about to be replaced
    expected = net.state_dict()
    # BatchNorm's num_batches_tracked is bookkeeping that older files lack; everything else
    # must match exactly.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape (e.g. {wrong[0]})")
        raise UserError(f"FID weights {path} do not fit pytorch-fid's Inception: "
                        f"{', '.join(parts)} tensors ({hint})")
    full = {k: state[k].to(expected[k].dtype) if k in state else torch.zeros((), dtype=torch.long)
            for k in expected}
    bad = [k for k, v in full.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"FID weights {path} contain NaN or inf (e.g. {bad[0]}; {hint})")
    net.load_state_dict(full, strict=True, assign=True)
    return net.eval()


def _fid_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pool3 features of pytorch-fid's InceptionV3 (blocks 0-3), input already in [-1, 1]."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = net.Conv2d_1a_3x3(x)
    x = net.Conv2d_2a_3x3(x)
    x = net.Conv2d_2b_3x3(x)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = net.Conv2d_3b_1x1(x)
    x = net.Conv2d_4a_3x3(x)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                 "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
        x = getattr(net, name)(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def inception_features(net: nn.Module, images: torch.Tensor, *, batch: int = 32) -> torch.Tensor:
    """(n, 2048) float64 pool3 features of [-1, 1] images.

    pytorch-fid takes [0, 1] images, resizes them bilinearly to 299x299 and then maps them to
    [-1, 1] with ``2x - 1``. Bilinear resizing commutes with that affine map, so [-1, 1]
    images are resized and fed directly. Images are first quantised to 8 bits, as the PNG or
    JPEG files pytorch-fid reads would be.
    """
    _check_images("images", images)
    device = next(net.parameters()).device
    feats: list[torch.Tensor] = []
    with torch.no_grad():
        for a in range(0, images.shape[0], batch):
            x = _to_255(images[a:a + batch]) / 127.5 - 1.0
            feats.append(_fid_forward(net, x.to(device)).to("cpu", torch.float64))
    return torch.cat(feats)


def _gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.to(torch.float64)
    mu = f.mean(dim=0)
    if f.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set")
    centered = f - mu
    return mu, centered.t() @ centered / (f.shape[0] - 1)  # np.cov(rowvar=False)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2)`` without scipy.

    ``S1 S2`` is similar to the symmetric PSD ``sqrt(S1) S2 sqrt(S1)``, so
    ``tr sqrtm(S1 S2)`` is the sum of the square roots of that matrix's eigenvalues
    (negative round-off eigenvalues clipped to 0).
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    s1, s2 = (s1 + s1.t()) / 2, (s2 + s2.t()) / 2
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.t()
    m = root1 @ s2 @ root1
    m = (m + m.t()) / 2
    tr_covmean = torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)


def fid_from_weights(real: torch.Tensor, fake: torch.Tensor, weights_path: str | Path, *,
                     batch: int = 32, device: str | torch.device | None = None) -> float:
    """FID between two [-1, 1] image sets with the pytorch-fid Inception weights file
    (``pt_inception-2015-12-05-6726825d.pth``, loaded with ``weights_only=True``)."""
    _check_images("real", real)
    _check_images("fake", fake)
    net = load_fid_inception(weights_path)
    if device is not None:
        net = net.to(device)
    return frechet_distance_of_features(inception_features(net, real, batch=batch),
                                        inception_features(net, fake, batch=batch))


def frechet_distance_of_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (rows are images).

    With fewer images than feature dimensions (512 images against Inception's 2048), each
    covariance ``S = AᵀA / (n - 1)`` (``A``: the centred features) has rank below ``n``, and
    ``tr sqrtm(S1 S2)`` is the sum of the singular values of ``A1 A2ᵀ / sqrt((n1-1)(n2-1))``:
    the non-zero eigenvalues of ``S1 S2`` are those of ``M Mᵀ`` for that ``M``. That is exact,
    and an n1 x n2 SVD costs far less than two 2048 x 2048 eigendecompositions. With more
    images the covariances themselves are the smaller matrices (:func:`frechet_distance`).
    """
    n1, n2, dims = f1.shape[0], f2.shape[0], f1.shape[1]
    if min(n1, n2) >= dims:
        mu1, s1 = _gaussian(f1)
        mu2, s2 = _gaussian(f2)
        return frechet_distance(mu1, s1, mu2, s2)
    if n1 < 2 or n2 < 2:
        raise ValueError("FID needs at least 2 images per set")
    a, b = f1.to(torch.float64), f2.to(torch.float64)
    mu1, mu2 = a.mean(dim=0), b.mean(dim=0)
    a, b = a - mu1, b - mu2
    tr1, tr2 = (a * a).sum() / (n1 - 1), (b * b).sum() / (n2 - 1)
    tr_covmean = torch.linalg.svdvals(a @ b.t()).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return max(float(diff @ diff + tr1 + tr2 - 2 * tr_covmean), 0.0)


# ---------------------------------------------------------------------------------------
# Evaluating a generator against a dataset.

_REAL_CACHE: dict[tuple[str, str, int, int], torch.Tensor] = {}
_REAL_LOCK = threading.Lock()


def _sample_real(dataset, n: int, seed: int, batch: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``n`` dataset images drawn with a seeded choice (without replacement when the dataset
    is large enough); unreadable images are skipped and replaced by further draws."""
    key = (str(getattr(dataset, "path", id(dataset))), str(getattr(dataset, "fingerprint", "")), n, seed)
    with _REAL_LOCK:
        cached = _REAL_CACHE.get(key)
    if cached is not None:
        return cached
    size = len(dataset)
    if size < 1:
        raise UserError("dataset holds no images")
    rng = np.random.default_rng(np.random.SeedSequence([seed & _MASK64, 0x5EA1]))
    replace = n > size
    order = None if replace else rng.permutation(size)
    max_draws = 2 * n + 64 if replace else size
    got: list[torch.Tensor] = []
    have = drawn = 0
    while have < n and drawn < max_draws:
        take = min(batch, n - have, max_draws - drawn)
        idx = rng.integers(0, size, take) if order is None else order[drawn:drawn + take]
        drawn += take
        images, _bad = dataset.load([int(i) for i in idx])
        if images.shape[0]:
            got.append(images)
            have += images.shape[0]
    if not got:
        raise UserError(f"no readable images in dataset {getattr(dataset, 'path', '')} "
                        f"(check the files, or make one with `ganns-async data synth`)")
    real = torch.cat(got)[:n]
    with _REAL_LOCK:
        _REAL_CACHE.clear()  # keep only the latest set (about 100 MB at n=2048)
        _REAL_CACHE[key] = real
    return real


def _generate(g: nn.Module, n: int, seed: int, batch: int) -> torch.Tensor:
    from ganns_async.training import generate, unit_noise

    noise = unit_noise(seed ^ 0xE7A1, n)
    return torch.cat([generate(g, noise[a:a + batch]) for a in range(0, n, batch)])  # type: ignore[arg-type]


def evaluate_generator(g: nn.Module, dataset, *, n: int = 2048, seed: int = 0,  # type: ignore[no-untyped-def]
                       fid_weights: str | Path | None = None, batch: int = 256) -> dict[str, float]:
    """SWD (and FID with ``fid_weights``) of ``g``'s eval-mode samples against ``dataset``.

    ``g`` is copied first, so a caller on another thread may keep training the original
    (take the copy under whatever lock guards the weights); the live module is not touched.
    Fakes come from ``unit_noise(seed ^ 0xE7A1, n)``; reals from a seeded draw of ``n``
    dataset images. If fewer than ``n`` real images are readable, both sets shrink to match.
    """
    if n < 1:
        raise UserError(f"number of evaluation images must be at least 1, got {n}")
    snapshot = copy.deepcopy(g)
    snapshot.eval()
    real = _sample_real(dataset, n, seed, batch)
    fake = _generate(snapshot, real.shape[0], seed, batch)
    result = sliced_wasserstein(real, fake, seed=seed)
    if fid_weights is not None:
        result["fid"] = fid_from_weights(real, fake, Path(fid_weights))
    return result


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, n: int = 2048, seed: int = 0,
                        fid_weights: Path | None = None, batch: int = 256) -> dict[str, float]:
    """SWD (and FID) of the generator in a checkpoint file against the dataset at ``data``."""
    from ganns_async.data import ImageDataset

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass a .pt file saved by training)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot load checkpoint {path}: {why_load_failed(path, exc)} "
                        f"(pass a .pt file saved by training)") from None
    state = ckpt.get("generator_state_dict") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserError(f"{path} is not a GAN checkpoint: it has no 'generator_state_dict' "
                        f"(pass a .pt file saved by training)")
    # The width a run was trained at (--feature-maps) is in its first layer's shape.
    g = Generator(feature_maps=feature_maps_of(state) or FEATURE_MAPS)
    try:
        g.load_state_dict(dict(state), strict=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        raise UserError(f"generator weights in {path} do not fit the 64x64 DCGAN: {reason}") from None
    for v in g.state_dict().values():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"generator weights in {path} contain NaN or inf (pick an earlier checkpoint)")
    with ImageDataset.open(data) as dataset:
        result = evaluate_generator(g, dataset, n=n, seed=seed, fid_weights=fid_weights, batch=batch)
    return {k: float(v) for k, v in result.items()}
