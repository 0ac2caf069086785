"""Tests for the image dataset and synthetic CelebA generator (no database needed)."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ganns_async import data
from ganns_async.data import IMAGE_SIZE, ImageDataset, write_synthetic
from ganns_async.errors import UserError

COUNT = 24


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own checksum cache, never the user's."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "ganns-async" / "folder-crc"


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


@pytest.mark.parametrize("size", [(178, 218), (218, 178), (64, 64), (65, 64), (64, 65), (63, 200), (30, 40),
                                  (1, 1), (3, 700), (700, 3), (1000, 999), (250, 250), (127, 129)])
def test_preprocess_equals_torchvision_bit_for_bit(size: tuple[int, int]) -> None:
    """The written-out transform against torchvision's, on shapes that exercise each rounding
    (truncated long side, the centre crop's round, upscaling, no resize at all)."""
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    g = torch.Generator().manual_seed(size[0] * 7919 + size[1])
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g).numpy()
    img = Image.fromarray(pixels, "RGB")
    assert torch.equal(data.preprocess(img), tf(img))


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


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4096\n"


@pytest.mark.parametrize("junk, why", [
    (b"this is not a jpeg at all" * 10, "not a JPEG or PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(60), "not a JPEG or PNG image"),  # a JPEG's first bytes, then nothing
    (LFS_POINTER, "git lfs pull"),  # a repository cloned without Git LFS
])
@pytest.mark.parametrize("container", ["zip", "folder"])
def test_a_dataset_whose_files_are_not_images_is_refused(tmp_path: Path, junk: bytes, why: str,
                                                         container: str) -> None:
    """Every image would cost one sample (see above), so training would go on with nothing:
    refused at open, with the file and the reason."""
    names = [f"img_align_celeba/{k:06d}.jpg" for k in range(1, 41)]
    if container == "zip":
        path = tmp_path / "junk.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name in names:
                zf.writestr(name, junk)
    else:
        path = tmp_path / "junk"
        for name in names:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(junk)
    with pytest.raises(UserError, match="holds no image that can be decoded") as exc:
        ImageDataset.open(path)
    message = str(exc.value)
    assert str(path) in message and "checked 32 of 40" in message and "000001.jpg" in message
    assert why in message and "BytesIO" not in message


def test_a_dataset_with_a_few_images_among_junk_opens(synth_zip: Path, tmp_path: Path) -> None:
    """One image that decodes is enough: the first images checked are junk, a later one is not."""
    mixed = tmp_path / "mixed.zip"
    with zipfile.ZipFile(synth_zip) as src, zipfile.ZipFile(mixed, "w") as dst:
        for k in range(1, 30):
            dst.writestr(f"img_align_celeba/{k:06d}.jpg", LFS_POINTER)
        dst.writestr("img_align_celeba/000030.jpg", src.read("img_align_celeba/000001.jpg"))
    with ImageDataset.open(mixed) as ds:
        x, bad = ds.load([0, 29])
    assert bad == [0] and x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


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


# ------------------------------------------------------------------ fingerprint covers content

def _tweak(blob: bytes) -> bytes:
    """Same length, one byte different: what a naive edit of an image looks like."""
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0x55]) + blob[middle + 1:]


@pytest.fixture()
def trust_fresh_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test folders were written a moment ago, and files changed less than 2 s
    before they are read are never cached; these tests need them cached at once."""
    monkeypatch.setattr(data, "_RACY_NS", 0)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    real = data._crc_file

    def counting(path: str):  # type: ignore[no-untyped-def]
        reads.append(path)
        return real(path)

    monkeypatch.setattr(data, "_crc_file", counting)
    return reads


def test_zip_with_one_image_changed_gets_another_fingerprint(synth_zip: Path, tmp_path: Path) -> None:
    changed = tmp_path / "changed.zip"
    target = "img_align_celeba/000007.jpg"
    with zipfile.ZipFile(synth_zip) as src, zipfile.ZipFile(changed, "w") as dst:
        for info in src.infolist():
            blob = src.read(info)
            dst.writestr(info, _tweak(blob) if info.filename == target else blob)
    with ImageDataset.open(synth_zip) as a, ImageDataset.open(changed) as b:
        assert a.names == b.names
        assert a.fingerprint != b.fingerprint
    with zipfile.ZipFile(synth_zip) as za, zipfile.ZipFile(changed) as zb:
        assert za.getinfo(target).file_size == zb.getinfo(target).file_size


def test_zip_fingerprint_reads_only_the_directory(synth_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening reads one member, the image the decodability check decodes; the fingerprint
    comes from the central directory."""
    with ImageDataset.open(synth_zip) as reference:
        expected = reference.fingerprint
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def counting_open(self: zipfile.ZipFile, name: str | zipfile.ZipInfo, *args: object, **kwargs: object):
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    with ImageDataset.open(synth_zip) as ds:
        assert ds.fingerprint == expected
    assert opened == ["img_align_celeba/000001.jpg"]


@pytest.mark.parametrize("cached", [False, True])
def test_folder_with_one_image_changed_gets_another_fingerprint(synth_zip: Path, synth_folder: Path,
                                                                tmp_path: Path, cached: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if cached:  # the first open caches every file; the ctime must still give the change away
        monkeypatch.setattr(data, "_RACY_NS", 0)
    copy = Path(shutil.copytree(synth_folder, tmp_path / "copy"))
    with ImageDataset.open(synth_zip) as dz, ImageDataset.open(copy) as dc:
        assert dz.fingerprint == dc.fingerprint          # container-independent
        original = dc.fingerprint
    reads = _count_reads(monkeypatch)
    victim = copy / "img_align_celeba" / "000011.jpg"
    st = victim.stat()
    time.sleep(0.05)                                     # past the file system's clock tick
    victim.write_bytes(_tweak(victim.read_bytes()))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # a naive copy keeps size and mtime
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    with ImageDataset.open(copy) as dc, ImageDataset.open(synth_zip) as dz:
        assert dc.fingerprint != original
        assert dc.fingerprint != dz.fingerprint
        assert dc.names == dz.names
    assert len(reads) == (1 if cached else COUNT)


def test_folder_checksums_are_cached(synth_folder: Path, synth_zip: Path, private_cache: Path,
                                     monkeypatch: pytest.MonkeyPatch, trust_fresh_files: None) -> None:
    reads = _count_reads(monkeypatch)
    calls: list[tuple[int, int]] = []
    with ImageDataset.open(synth_folder, progress=lambda d, t: calls.append((d, t))) as first:
        fingerprint = first.fingerprint
    assert len(reads) == COUNT
    assert calls == [(COUNT, COUNT)]
    cache_files = list(private_cache.glob("*.json"))
    assert len(cache_files) == 1
    doc = json.loads(cache_files[0].read_text())
    assert doc["root"] == os.path.abspath(synth_folder) and len(doc["files"]) == COUNT

    reads.clear()
    calls.clear()
    with ImageDataset.open(synth_folder, progress=lambda d, t: calls.append((d, t))) as second:
        assert second.fingerprint == fingerprint
    assert reads == [] and calls == []                # no file content read the second time
    with ImageDataset.open(synth_zip) as dz:
        assert dz.fingerprint == fingerprint


def test_a_changed_file_invalidates_only_its_cache_entry(synth_folder: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         trust_fresh_files: None) -> None:
    copy = Path(shutil.copytree(synth_folder, tmp_path / "copy"))
    with ImageDataset.open(copy) as ds:
        before = ds.fingerprint
    reads = _count_reads(monkeypatch)
    victim = copy / "img_align_celeba" / "000003.jpg"
    st = victim.stat()
    victim.write_bytes(_tweak(victim.read_bytes()))
    # Same size; the mtime is moved explicitly so the test does not depend on the
    # file system's timestamp resolution (the rewrite may land in the same clock tick).
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))
    with ImageDataset.open(copy) as ds:
        after = ds.fingerprint
    assert reads == [str(victim)]
    assert after != before
    reads.clear()
    with ImageDataset.open(copy) as ds:
        assert ds.fingerprint == after
    assert reads == []
    victim.unlink()                                   # a removed file drops out of the cache too
    with ImageDataset.open(copy) as ds:
        assert len(ds) == COUNT - 1
    assert reads == []


def test_a_bad_or_unwritable_cache_is_ignored(synth_folder: Path, synth_zip: Path, private_cache: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              trust_fresh_files: None) -> None:
    with ImageDataset.open(synth_zip) as dz:
        expected = dz.fingerprint
    with ImageDataset.open(synth_folder):
        pass
    (cache_file,) = private_cache.glob("*.json")
    reads = _count_reads(monkeypatch)
    for junk in ("{not json", "[]", json.dumps({"format": 1, "root": "/elsewhere", "files": {}}),
                 json.dumps({"format": 1, "root": os.path.abspath(synth_folder),
                             "files": {k: "x" for k in ("img_align_celeba/000001.jpg",)}})):
        cache_file.write_text(junk)
        reads.clear()
        with ImageDataset.open(synth_folder) as ds:
            assert ds.fingerprint == expected
        assert len(reads) >= 1
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    for _ in range(2):
        reads.clear()
        with ImageDataset.open(synth_folder) as ds:
            assert ds.fingerprint == expected
        assert len(reads) == COUNT                       # no cache: read every time, quietly


def test_unreadable_folder_file_is_a_user_error(synth_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    copy = Path(shutil.copytree(synth_folder, tmp_path / "copy"))

    def denied(path: str):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(data, "_crc_file", denied)
    with pytest.raises(UserError, match=r"cannot read dataset file .*\.jpg: Permission denied"):
        ImageDataset.open(copy)


def test_files_changed_just_before_they_were_read_are_not_cached(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite in the same clock tick as the read would keep size, mtime and ctime:
    so a file changed under 2 s before it was read is read again next time."""
    folder = write_synthetic(tmp_path / "fresh", 6, seed=5)
    reads = _count_reads(monkeypatch)
    with ImageDataset.open(folder) as first:
        fingerprint = first.fingerprint
    with ImageDataset.open(folder) as second:
        assert second.fingerprint == fingerprint
    assert len(reads) == 12
