"""Tests for the image dataset and synthetic CelebA generator (no database needed)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ganns_async.data import IMAGE_SIZE, ImageDataset, write_synthetic
from ganns_async.errors import UserError

COUNT = 24


@pytest.fixture(scope="module")
def synth_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth") / "celeba.zip", COUNT, seed=3)


@pytest.fixture(scope="module")
def synth_folder(synth_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extracted")
    with zipfile.ZipFile(synth_zip) as zf:
        zf.extractall(out)
    return out


def test_synth_zip_layout(synth_zip: Path) -> None:
    with zipfile.ZipFile(synth_zip) as zf:
        files = [i for i in zf.infolist() if not i.is_dir()]
        assert [i.filename for i in files] == [f"img_align_celeba/{k:06d}.jpg" for k in range(1, COUNT + 1)]
        for info in files[:5]:
            with Image.open(io.BytesIO(zf.read(info))) as im:
                assert im.format == "JPEG"
                assert im.size == (178, 218)
    assert not list(synth_zip.parent.glob(".*tmp")), "temporary file left behind"


def test_synth_deterministic(tmp_path: Path, synth_zip: Path) -> None:
    again = write_synthetic(tmp_path / "a.zip", COUNT, seed=3)
    other = write_synthetic(tmp_path / "b.zip", COUNT, seed=4)
    assert again.read_bytes() == synth_zip.read_bytes()
    assert other.read_bytes() != synth_zip.read_bytes()


def test_synth_images_differ(synth_zip: Path) -> None:
    with zipfile.ZipFile(synth_zip) as zf:
        blobs = {zf.read(f"img_align_celeba/{k:06d}.jpg") for k in range(1, COUNT + 1)}
    assert len(blobs) == COUNT


def test_synth_folder_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    out = write_synthetic(tmp_path / "faces", 250, seed=1, progress=lambda d, t: calls.append((d, t)))
    assert out == tmp_path / "faces"
    assert len(list((out / "img_align_celeba").glob("*.jpg"))) == 250
    assert calls == [(100, 250), (200, 250), (250, 250)]


def test_synth_bad_count(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="at least 1"):
        write_synthetic(tmp_path / "x.zip", 0)


def test_open_and_load(synth_zip: Path) -> None:
    with ImageDataset.open(synth_zip) as ds:
        assert len(ds) == COUNT
        assert ds.names == [f"{k:06d}.jpg" for k in range(1, COUNT + 1)]
        assert len(ds.fingerprint) == 16
        x, bad = ds.load([5, 0, 23, 5])
        assert bad == []
        assert x.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.min() < -0.5 and x.max() > 0.5  # really spans the range
        assert torch.equal(x[0], x[3])
        assert not torch.equal(x[0], x[1])
        with pytest.raises(IndexError):
            ds.load([COUNT])
        with pytest.raises(IndexError):
            ds.load([-1])


def test_zip_and_folder_agree(synth_zip: Path, synth_folder: Path) -> None:
    with ImageDataset.open(synth_zip) as dz, ImageDataset.open(synth_folder) as df:
        assert dz.fingerprint == df.fingerprint
        assert dz.names == df.names
        idx = [0, 7, 13, COUNT - 1]
        xz, _ = dz.load(idx)
        xf, _ = df.load(idx)
        assert torch.equal(xz, xf)


def test_different_images_different_fingerprint(synth_zip: Path, tmp_path: Path) -> None:
    fewer = write_synthetic(tmp_path / "fewer.zip", COUNT - 1, seed=3)
    other_seed = write_synthetic(tmp_path / "other.zip", COUNT, seed=9)
    with ImageDataset.open(synth_zip) as a, ImageDataset.open(fewer) as b, ImageDataset.open(other_seed) as c:
        assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


def test_matches_dcgan_tutorial_transform(synth_zip: Path) -> None:
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    with zipfile.ZipFile(synth_zip) as zf:
        ref = tf(Image.open(io.BytesIO(zf.read("img_align_celeba/000002.jpg"))).convert("RGB"))
    with ImageDataset.open(synth_zip) as ds:
        x, _ = ds.load([1])
    assert torch.equal(x[0], ref)


def test_corrupt_images_skipped(synth_zip: Path, tmp_path: Path) -> None:
    bad_zip = tmp_path / "bad.zip"
    with zipfile.ZipFile(synth_zip) as src, zipfile.ZipFile(bad_zip, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        good = src.read("img_align_celeba/000001.jpg")
        dst.writestr("img_align_celeba/900001.jpg", b"this is not a jpeg at all" * 10)
        dst.writestr("img_align_celeba/900002.jpg", good[: len(good) // 3])  # truncated
        dst.writestr("img_align_celeba/900003.jpg", b"")  # zero bytes
        dst.writestr("__MACOSX/img_align_celeba/._000001.jpg", b"junk")
        dst.writestr("img_align_celeba/.hidden.jpg", b"junk")
        dst.writestr("img_align_celeba/readme.txt", b"not an image")
    with ImageDataset.open(bad_zip) as ds:
        assert len(ds) == COUNT + 3
        bad_idx = [ds.names.index(f"90000{k}.jpg") for k in (1, 2, 3)]
        x, bad = ds.load([0, bad_idx[0], 1, bad_idx[1], bad_idx[2]])
        assert x.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert bad == bad_idx
        ref, _ = ds.load([0, 1])
        assert torch.equal(x, ref)
        empty, bad = ds.load(bad_idx)
        assert empty.shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE) and bad == bad_idx


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.zip"
    with pytest.raises(UserError, match="dataset not found") as exc:
        ImageDataset.open(missing)
    assert str(missing) in str(exc.value) and "data synth" in str(exc.value)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="no images"):
        ImageDataset.open(tmp_path)


def test_not_a_zip(tmp_path: Path) -> None:
    f = tmp_path / "celeba.zip"
    f.write_bytes(b"definitely not a zip archive")
    with pytest.raises(UserError, match="not a readable zip"):
        ImageDataset.open(f)


def test_zip_without_images(tmp_path: Path) -> None:
    f = tmp_path / "empty.zip"
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("img_align_celeba/", b"")
    with pytest.raises(UserError, match="no images"):
        ImageDataset.open(f)


def test_load_after_close(synth_zip: Path) -> None:
    ds = ImageDataset.open(synth_zip)
    ds.close()
    ds.close()
    with pytest.raises(RuntimeError):
        ds.load([0])
