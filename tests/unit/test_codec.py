"""Tests for ganns_async.codec: round trips and refusal of hostile blobs."""

from __future__ import annotations

import math
import random
import time
import tracemalloc
import warnings

import msgpack
import pytest
import torch
import zstandard

from ganns_async.codec import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    GRADIENT_META,
    WEIGHTS_META,
    Int,
    MapOf,
    MetaSchema,
    Number,
    Text,
    check_meta_schema,
    decode_tensors,
    encode_tensors,
    spec_budget,
    tensor_spec,
)
from ganns_async.errors import PayloadError, UserError
from ganns_async.model import build_models
from ganns_async.training import state_tensors


# ------------------------------------------------------------------ helpers

def _zstd(data: bytes, **kwargs) -> bytes:
    return zstandard.ZstdCompressor(**kwargs).compress(data)


def _raw_doc(tensors: list, *, meta: dict | None = None, fmt: int = FORMAT_VERSION) -> bytes:
    """A hand-built payload, so tests can say things the encoder never would."""
    doc = {"format": fmt, "meta": meta or {}, "tensors": tensors}
    return _zstd(msgpack.packb(doc, use_bin_type=True))


def _f32_entry(name: str, values: list[float], shape: list[int] | None = None) -> list:
    t = torch.tensor(values, dtype=torch.float32)
    return [name, "f32", shape if shape is not None else list(t.shape), t.numpy().astype("<f4").tobytes()]


@pytest.fixture(scope="module")
def models():
    return build_models(0)


@pytest.fixture()
def small_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(4, 3, generator=gen),
        "b": torch.randn(3, generator=gen),
        "count": torch.tensor(7, dtype=torch.int64),
    }


# --------------------------------------------------------------- round trips

def test_fp32_round_trip_is_exact():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 5, generator=gen)
    tensors = {
        "matrix": torch.randn(16, 3, 4, 4, generator=gen),
        "transposed": base.t(),                    # non-contiguous
        "strided": base[::2, 1:],                  # non-contiguous
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 7),
        "extremes": torch.tensor([0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38, 1e-30]),
        "half": torch.randn(10, generator=gen).half(),
        "double": torch.tensor([1.0 / 3.0], dtype=torch.float64),
    }
    out, meta = decode_tensors(encode_tensors(tensors))
    assert meta == {}
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        got = out[name]
        assert got.dtype == torch.float32, name
        assert got.device.type == "cpu"
        assert got.shape == t.shape, name
        assert torch.equal(got, t.float()), name
    assert torch.equal(torch.signbit(out["extremes"]), torch.signbit(tensors["extremes"]))


def test_decoded_tensors_are_writable_copies():
    blob = encode_tensors({"w": torch.ones(64)})
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)       # torch warns only once per process otherwise
    try:
        with warnings.catch_warnings():
            # torch warns when wrapping a read-only buffer, i.e. one aliasing the payload
            warnings.simplefilter("error")
            out, _ = decode_tensors(blob)
            out_bf16, _ = decode_tensors(encode_tensors({"w": torch.ones(64)}, float_dtype="bf16"))
            out_int, _ = decode_tensors(encode_tensors({"n": torch.arange(5)}))
    finally:
        torch.set_warn_always(warn_always)
    out_bf16["w"].add_(1.0)
    out_int["n"].add_(1)
    out["w"].add_(1.0)                     # would warn/raise on a read-only buffer
    assert out["w"].is_contiguous()
    again, _ = decode_tensors(blob)
    assert torch.equal(again["w"], torch.ones(64))
    # bytes-likes that a database driver may return are accepted too
    assert torch.equal(decode_tensors(memoryview(blob))[0]["w"], torch.ones(64))
    assert torch.equal(decode_tensors(bytearray(blob))[0]["w"], torch.ones(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_encode():
    t = torch.randn(32, 16, device="cuda").t()
    out, _ = decode_tensors(encode_tensors({"t": t}))
    assert out["t"].device.type == "cpu"
    assert torch.equal(out["t"], t.cpu())


def test_bf16_round_trip_precision_and_size(models):
    g, d = models
    gen = torch.Generator().manual_seed(2)
    # DCGAN-sized tensors with gradient-like scales (weights are N(0, 0.02)).
    state = {f"G.{k}": v + 1e-3 * torch.randn(v.shape, generator=gen)
             for k, v in g.state_dict().items() if v.is_floating_point()}
    state.update({f"D.{k}": v + 1e-3 * torch.randn(v.shape, generator=gen)
                  for k, v in d.state_dict().items() if v.is_floating_point()})
    fp32_blob = encode_tensors(state, float_dtype="fp32")
    bf16_blob = encode_tensors(state, float_dtype="bf16")
    assert len(bf16_blob) < 0.6 * len(fp32_blob)

    out, _ = decode_tensors(bf16_blob, expected=tensor_spec(state))
    changed = 0
    for name, t in state.items():
        got = out[name]
        assert got.dtype == torch.float32
        # bf16 keeps 8 significant bits: relative error at most 2**-9 (~2e-3).
        assert torch.allclose(got, t, rtol=1e-2, atol=0.0), name
        assert torch.equal(got, t.to(torch.bfloat16).float()), name
        changed += int((got != t).sum())
    assert changed > 0, "bf16 payload decoded exactly: it was not stored as bf16"


def test_int64_buffers_preserved_in_both_modes():
    ints = torch.tensor([0, -1, 2**53 + 1, -(2**63), 2**63 - 1], dtype=torch.int64)
    tensors = {
        "ints": ints,
        "num_batches_tracked": torch.tensor(123456789012, dtype=torch.int64),
        "int32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "mask": torch.tensor([True, False]),
        "floats": torch.tensor([1.5, 2.5]),
    }
    for mode in ("fp32", "bf16"):
        out, _ = decode_tensors(encode_tensors(tensors, float_dtype=mode))
        assert out["ints"].dtype == torch.int64
        assert torch.equal(out["ints"], ints)
        assert out["num_batches_tracked"].shape == ()
        assert out["num_batches_tracked"].item() == 123456789012
        assert out["int32"].dtype == torch.int64
        assert out["int32"].tolist() == [1, -2, 3]
        assert out["mask"].tolist() == [1, 0]
        assert out["floats"].dtype == torch.float32


def test_meta_round_trip():
    meta = {
        "step": 42,
        "lr": 2e-4,
        "worker": "w-3",
        "ok": True,
        "none": None,
        "big": 2**63 - 1,
        "nested": {"betas": [0.5, 0.999], "tags": ["a", {"b": []}]},
    }
    out, got = decode_tensors(encode_tensors({"x": torch.zeros(2)}, meta=meta))
    assert got == meta
    assert list(out) == ["x"]


def test_meta_rejects_non_plain_values_on_encode():
    with pytest.raises(TypeError, match="not a string"):
        encode_tensors({}, meta={"m": {1: "int key"}})
    with pytest.raises(TypeError, match="unsupported type"):
        encode_tensors({}, meta={"m": object()})


def test_encode_rejects_bad_float_dtype():
    with pytest.raises(ValueError, match="float_dtype"):
        encode_tensors({"x": torch.zeros(1)}, float_dtype="fp16")


def test_model_state_round_trip(models):
    g, d = models
    for model, seed in ((g, 1), (d, 2)):
        state = model.state_dict()
        blob = encode_tensors(state, meta={"kind": type(model).__name__})
        out, meta = decode_tensors(blob, expected=tensor_spec(state))
        assert meta == {"kind": type(model).__name__}
        assert set(out) == set(state)
        for name, t in state.items():
            assert out[name].dtype == (torch.float32 if t.is_floating_point() else torch.int64)
            assert torch.equal(out[name], t), name

        fresh = build_models(seed)[0 if model is g else 1]
        fresh.load_state_dict(out, strict=True)
        fresh.eval()
        model.eval()
        x = torch.randn(2, 100, 1, 1) if model is g else torch.rand(2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
        model.train()


def test_tensor_spec(models):
    g, _ = models
    spec = tensor_spec(g.state_dict())
    assert spec["main.0.weight"] == ((100, 512, 4, 4), "float")
    assert spec["main.1.num_batches_tracked"] == ((), "int")
    assert set(spec) == set(g.state_dict())


def test_defaults():
    assert FORMAT_VERSION == 1
    assert DEFAULT_MAX_BYTES == 512 * 1024 * 1024
    assert issubclass(PayloadError, UserError)


# --------------------------------------------------------------- rejections

def test_rejects_wrong_shape(small_state):
    blob = encode_tensors(small_state)
    spec = tensor_spec(small_state)
    spec["w"] = ((3, 4), "float")
    with pytest.raises(PayloadError, match=r"'w' has shape \(4, 3\), expected \(3, 4\)"):
        decode_tensors(blob, expected=spec)


def test_rejects_missing_name(small_state):
    blob = encode_tensors({k: v for k, v in small_state.items() if k != "b"})
    with pytest.raises(PayloadError, match=r"missing tensors: 'b'"):
        decode_tensors(blob, expected=tensor_spec(small_state))


def test_rejects_extra_name(small_state):
    blob = encode_tensors({**small_state, "intruder": torch.zeros(1)})
    with pytest.raises(PayloadError, match=r"unexpected tensors: 'intruder'"):
        decode_tensors(blob, expected=tensor_spec(small_state))


def test_rejects_dtype_family_mismatch(small_state):
    blob = encode_tensors({**small_state, "count": torch.tensor(7.0)})
    with pytest.raises(PayloadError, match=r"'count' has dtype f32 \(float\), expected int"):
        decode_tensors(blob, expected=tensor_spec(small_state))


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf"),
                                        (float("-inf"), "Inf")])
def test_rejects_non_finite(small_state, mode, bad, word):
    poisoned = small_state["w"].clone()
    poisoned[2, 1] = bad
    blob = encode_tensors({**small_state, "w": poisoned}, float_dtype=mode)
    with pytest.raises(PayloadError, match=rf"'w' contains {word}"):
        decode_tensors(blob)


def test_rejects_fp32_overflow_to_inf_in_bf16():
    # 3.4e38 is finite in fp32 but rounds to +Inf in bf16: the decoder must notice.
    blob = encode_tensors({"big": torch.tensor([3.4e38])}, float_dtype="bf16")
    with pytest.raises(PayloadError, match="'big' contains Inf"):
        decode_tensors(blob)


def test_rejects_truncated_blob(models):
    blob = encode_tensors(models[0].state_dict())
    assert decode_tensors(blob)[0]                       # the whole blob is fine
    with pytest.raises(PayloadError, match="truncated"):
        decode_tensors(blob[: len(blob) // 2])
    with pytest.raises(PayloadError, match="truncated"):
        decode_tensors(blob[:-1])                        # only the checksum is cut
    small = encode_tensors({"x": torch.zeros(3)})
    with pytest.raises(PayloadError, match="truncated"):
        decode_tensors(small[:7])


def test_rejects_random_bytes():
    rng = random.Random(1234)
    with pytest.raises(PayloadError, match="not zstd"):
        decode_tensors(rng.randbytes(4096))
    with pytest.raises(PayloadError, match="not zstd"):
        decode_tensors(b"")


def test_rejects_corrupt_zstd_body():
    blob = bytearray(encode_tensors({"x": torch.arange(1000, dtype=torch.float32)}))
    blob[len(blob) // 2] ^= 0x5A
    with pytest.raises(PayloadError, match="corrupt"):
        decode_tensors(bytes(blob))


def test_rejects_trailing_bytes_after_frame():
    blob = encode_tensors({"x": torch.zeros(3)})
    with pytest.raises(PayloadError, match="trailing bytes after the zstd frame"):
        decode_tensors(blob + b"junk")
    with pytest.raises(PayloadError, match="trailing bytes after the zstd frame"):
        decode_tensors(blob + blob)


def test_rejects_zstd_of_non_msgpack():
    with pytest.raises(PayloadError, match="not valid msgpack"):
        decode_tensors(_zstd(b"\xc1 definitely not msgpack"))
    with pytest.raises(PayloadError, match="not valid msgpack"):
        decode_tensors(_zstd(b""))


def test_rejects_trailing_garbage_after_msgpack():
    good = msgpack.packb({"format": 1, "meta": {}, "tensors": []}, use_bin_type=True)
    assert decode_tensors(_zstd(good)) == ({}, {})
    with pytest.raises(PayloadError, match="trailing garbage"):
        decode_tensors(_zstd(good + b"\x00"))


@pytest.mark.parametrize("doc, reason", [
    ([1, {}, []], "top level is a list"),
    ({"meta": {}, "tensors": []}, "no integer 'format'"),
    ({"format": "1", "meta": {}, "tensors": []}, "no integer 'format'"),
    ({"format": 1, "tensors": []}, "not exactly format, meta, tensors"),
    ({"format": 1, "meta": {}, "tensors": [], "extra": 0}, "not exactly format, meta, tensors"),
    ({"format": 1, "meta": [], "tensors": []}, "'meta' is not a map"),
    ({"format": 1, "meta": {}, "tensors": {"x": 1}}, "'tensors' is not a list"),
    ({"format": 1, "meta": {}, "tensors": [["x", "f32", [1]]]}, "entry 0 is not a"),
    ({"format": 1, "meta": {}, "tensors": [[7, "f32", [1], b"\0" * 4]]}, "non-string name"),
    ({"format": 1, "meta": {}, "tensors": [["x", "f32", "1", b"\0" * 4]]}, "not a list of ints"),
    ({"format": 1, "meta": {}, "tensors": [["x", "f32", [True], b"\0" * 4]]}, "not a list of ints"),
    ({"format": 1, "meta": {}, "tensors": [["x", "f32", [1], "abcd"]]}, "not a byte string"),
    ({"format": 1, "meta": {"when": msgpack.Timestamp(0)}, "tensors": []}, "unsupported type Timestamp"),
    ({"format": 1, "meta": {b"k": 1}, "tensors": []}, "not a string"),
])
def test_rejects_wrong_structure(doc, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_tensors(_zstd(msgpack.packb(doc, use_bin_type=True)))


def test_rejects_unknown_format_version():
    with pytest.raises(PayloadError, match="format version 2 is not supported"):
        decode_tensors(_raw_doc([], fmt=2))


def test_rejects_unknown_dtype():
    entry = _f32_entry("x", [1.0, 2.0])
    entry[1] = "f16"
    with pytest.raises(PayloadError, match="'x' has unknown dtype 'f16'"):
        decode_tensors(_raw_doc([entry]))


def test_rejects_negative_dim():
    entry = ["x", "f32", [-1, -4], b"\0" * 16]      # product would be +4: consistent length
    with pytest.raises(PayloadError, match="negative dim"):
        decode_tensors(_raw_doc([entry]))


def test_rejects_byte_length_inconsistent_with_shape():
    good = _f32_entry("x", [1.0, 2.0, 3.0, 4.0], shape=[2, 2])
    assert decode_tensors(_raw_doc([good]))[0]["x"].shape == (2, 2)
    with pytest.raises(PayloadError, match=r"'x' has 16 bytes but shape \(2, 3\) of f32 needs 24"):
        decode_tensors(_raw_doc([_f32_entry("x", [1.0, 2.0, 3.0, 4.0], shape=[2, 3])]))
    with pytest.raises(PayloadError, match="'x' has 15 bytes"):
        decode_tensors(_raw_doc([["x", "f32", [4], b"\0" * 15]]))


def test_rejects_duplicate_names():
    entries = [_f32_entry("w", [1.0]), _f32_entry("w", [2.0])]
    with pytest.raises(PayloadError, match="duplicate tensor name 'w'"):
        decode_tensors(_raw_doc(entries))


def test_rejects_ext_type():
    with pytest.raises(PayloadError, match="extension type"):
        decode_tensors(_raw_doc([], meta={"payload": msgpack.ExtType(42, b"os.system")}))
    entry = _f32_entry("x", [1.0])
    entry[3] = msgpack.ExtType(1, entry[3])
    with pytest.raises(PayloadError, match="extension type"):
        decode_tensors(_raw_doc([entry]))


def test_rejects_oversized_blob():
    blob = encode_tensors({"zeros": torch.zeros(256 * 1024)})    # 1 MiB of zeros
    assert len(blob) < 1000
    assert decode_tensors(blob)[0]["zeros"].numel() == 256 * 1024
    with pytest.raises(PayloadError, match=r"declares \d+ decompressed bytes, over the cap of 1000"):
        decode_tensors(blob, max_bytes=1000)


def test_cap_is_exact():
    blob = encode_tensors({"x": torch.arange(100, dtype=torch.float32)})
    size = len(zstandard.ZstdDecompressor().decompress(blob))
    assert decode_tensors(blob, max_bytes=size)[0]["x"].numel() == 100
    with pytest.raises(PayloadError, match=f"cap of {size - 1}"):
        decode_tensors(blob, max_bytes=size - 1)


def test_rejects_oversized_frame_without_content_size():
    # The header gives no size, so only the streaming cap can stop this.
    bomb = _zstd(bytes(1 << 20), write_content_size=False)
    assert zstandard.get_frame_parameters(bomb).content_size == zstandard.CONTENTSIZE_UNKNOWN
    with pytest.raises(PayloadError, match="decompresses to more than the cap of 1000 bytes"):
        decode_tensors(bomb, max_bytes=1000)


def test_rejects_frame_with_lying_content_size():
    # Declares 500 bytes but holds 8 MiB: neither the header nor the data wins.
    bomb = bytearray(_zstd(bytes(8 << 20), level=1))
    fhd = bomb[4]
    assert fhd >> 6 == 2                          # a 4-byte content size field
    offset = 5 if (fhd >> 5) & 1 else 6           # after the window byte, if any
    bomb[offset:offset + 4] = (500).to_bytes(4, "little")
    assert zstandard.get_frame_parameters(bytes(bomb)).content_size == 500
    with pytest.raises(PayloadError, match="corrupt"):
        decode_tensors(bytes(bomb))


def test_bomb_never_allocates_past_the_cap():
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    chunk = bytes(1 << 20)
    bomb = b"".join(cobj.compress(chunk) for _ in range(64)) + cobj.flush()   # 64 MiB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="cap"):
            decode_tensors(bomb, max_bytes=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * (1 << 20), f"decoding a capped bomb peaked at {peak} bytes"


def test_amplification_bombs_are_refused_at_once() -> None:
    """A few hundred bytes that would unpack into millions of Python objects (issue: 2 KiB
    cost 33 s and 557 MiB) are refused by msgpack's length limits, spec or not."""
    import time

    g, d = build_models(0)
    spec = tensor_spec(state_tensors(g, d))
    bombs = {
        "list": {"format": 1, "meta": {"x": [None] * 5_000_000}, "tensors": []},
        "map": None,  # raw bytes below: one key repeated, as a hostile packer may write it
        "shape": {"format": 1, "meta": {}, "tensors": [["a", "f32", [1] * 100_000, b""]]},
    }
    repeated_map = (b"\x83" + msgpack.packb("format") + msgpack.packb(1) + msgpack.packb("meta")
                    + b"\xdf" + (1_000_000).to_bytes(4, "big") + b"\xa1k\x00" * 1_000_000
                    + msgpack.packb("tensors") + msgpack.packb([]))
    for kind, doc in bombs.items():
        raw = repeated_map if doc is None else msgpack.packb(doc)
        blob = zstandard.ZstdCompressor(level=19).compress(raw)
        assert len(blob) < 4096, kind
        for expected in (None, spec):
            started = time.perf_counter()
            with pytest.raises(PayloadError, match="exceeds max"):
                decode_tensors(blob, expected=expected)
            assert time.perf_counter() - started < 5, kind  # generous: it takes milliseconds


def test_the_spec_bounds_what_is_decompressed() -> None:
    """With an expected spec, a payload may not decompress (or arrive) larger than an
    honest one could be."""
    small = {"w": torch.zeros(4, 4)}
    spec = tensor_spec(small)
    assert spec_budget(spec) < 128 * 1024
    padded = encode_tensors(small, meta={"pad": "x" * 60_000})  # under the slack: fine
    decode_tensors(padded, expected=spec)
    too_big = encode_tensors(small, meta={"pad": ["y" * 60_000] * 4})
    with pytest.raises(PayloadError, match="cap"):
        decode_tensors(too_big, expected=spec)
    incompressible = encode_tensors({"w": torch.rand(256, 256)})
    with pytest.raises(PayloadError, match="more than a payload of this kind"):
        decode_tensors(incompressible, expected=spec)
    decode_tensors(incompressible)  # without a spec the general cap applies


# ------------------------------------------------------- zstd frame structure

_MAGIC = b"\x28\xb5\x2f\xfd"


def _raw_block_frame(data: bytes, size: int = 1) -> bytes:
    """A hand-built frame (4-byte content size, single segment, no checksum) that
    stores ``data`` as raw blocks of ``size`` bytes: a compressor never writes this."""
    parts = [_MAGIC, bytes([0xA0]), len(data).to_bytes(4, "little")]
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    for k, chunk in enumerate(chunks):
        last = int(k == len(chunks) - 1)
        parts.append((last | (len(chunk) << 3)).to_bytes(3, "little") + chunk)
    return b"".join(parts)


def _rle_bomb(blocks: int) -> bytes:
    """No content size, 128 KiB window, then ``blocks`` RLE blocks of 128 KiB of zeros:
    4 bytes each, so 100k blocks are a 400 KB blob that would expand to 12.5 GiB."""
    block = ((1 << 1) | (131072 << 3)).to_bytes(3, "little") + b"\x00"
    last = (1 | (1 << 1) | (131072 << 3)).to_bytes(3, "little") + b"\x00"
    return _MAGIC + bytes([0x00, 0x38]) + block * (blocks - 1) + last


def test_a_frame_of_100k_tiny_blocks_decodes_quickly():
    doc = msgpack.packb({"format": 1, "meta": {"pad": ["x" * 50_000, "y" * 49_930]}, "tensors": []})
    blob = _raw_block_frame(doc)
    assert len(blob) > 4 * len(doc) > 399_000                    # ~100k blocks
    assert zstandard.ZstdDecompressor().decompress(blob) == doc  # a valid frame
    started = time.perf_counter()
    _, meta = decode_tensors(blob)
    assert time.perf_counter() - started < 2      # one libzstd call: about a millisecond
    assert [len(x) for x in meta["pad"]] == [50_000, 49_930]
    with pytest.raises(PayloadError, match="truncated"):
        decode_tensors(blob[:-1])
    with pytest.raises(PayloadError, match="trailing bytes"):
        decode_tensors(blob + b"\x00")


def test_a_frame_of_100k_rle_blocks_is_refused_quickly():
    bomb = _rle_bomb(100_000)
    assert len(bomb) == 400_006
    for cap in (1 << 20, DEFAULT_MAX_BYTES):
        started = time.perf_counter()
        with pytest.raises(PayloadError, match=f"decompresses to more than the cap of {cap} bytes"):
            decode_tensors(bomb, max_bytes=cap)
        assert time.perf_counter() - started < 5, cap   # the cap bounds the work: ~0.05 s
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="cap"):
            decode_tensors(bomb, max_bytes=64 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * (1 << 20), f"decoding a capped RLE bomb peaked at {peak} bytes"


def test_a_header_cannot_declare_more_than_its_frame_can_hold():
    # 600 MiB declared by a 20-byte blob: refused before a buffer is sized from it.
    small = bytearray(_raw_block_frame(b"\x90"))
    small[5:9] = (300 << 20).to_bytes(4, "little")
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="corrupt .declares 314572800 bytes, more than"):
            decode_tensors(bytes(small))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_unsized_frames_are_held_to_one_complete_frame():
    doc = msgpack.packb({"format": 1, "meta": {"k": 1}, "tensors": []})
    unsized = _zstd(doc, write_content_size=False, write_checksum=True)
    assert decode_tensors(unsized) == ({}, {"k": 1})
    with pytest.raises(PayloadError, match="4 trailing bytes after the zstd frame"):
        decode_tensors(unsized + b"junk")
    with pytest.raises(PayloadError, match="trailing bytes after the zstd frame"):
        decode_tensors(unsized + unsized)
    with pytest.raises(PayloadError, match="truncated"):
        decode_tensors(unsized[:-1])
    corrupt = bytearray(unsized)
    corrupt[len(corrupt) // 2] ^= 0x40
    with pytest.raises(PayloadError, match="corrupt"):
        decode_tensors(bytes(corrupt))


def test_frames_the_encoder_never_writes_are_refused():
    empty = _zstd(b"")
    with pytest.raises(PayloadError, match="not valid msgpack"):
        decode_tensors(empty + b"junk")
    reserved = bytearray(encode_tensors({"x": torch.zeros(3)}))
    reserved[4] |= 0x08                                  # reserved frame header bit
    with pytest.raises(PayloadError, match="corrupt"):
        decode_tensors(bytes(reserved))
    with pytest.raises(PayloadError, match="zstd dictionary"):
        decode_tensors(_MAGIC + bytes([0x01, 0x58, 0x07]) + b"\x01\x00\x00")
    with pytest.raises(PayloadError, match="header incomplete"):
        decode_tensors(_MAGIC + bytes([0xC0]) + b"\x00\x00")


def _mutations(rng: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    kind = rng.randrange(6)
    if kind == 0:                                    # truncated anywhere
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:                                    # a few bit flips anywhere
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:                                    # a random byte in the headers
        data[rng.randrange(min(len(data), 24))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:                                    # junk after the frame
        return bytes(data) + rng.randbytes(rng.randint(1, 9))
    if kind == 4:                                    # the magic number, then noise
        return _MAGIC + rng.randbytes(rng.randrange(200))
    return rng.randbytes(rng.randrange(64))          # noise


def test_mangled_blobs_raise_only_payload_error(small_state):
    """Random, truncated and bit-flipped blobs, with and without a spec, sized and
    unsized frames: the only exception that may come out is PayloadError."""
    rng = random.Random(20240601)
    spec = tensor_spec(small_state)
    bases = [
        encode_tensors(small_state, meta={"n_samples": 8, "metrics": {"d_loss": 0.5}, "skipped": 0}),
        encode_tensors(small_state, float_dtype="bf16"),
        encode_tensors({"z": torch.zeros(20_000)}),
        _zstd(msgpack.packb({"format": 1, "meta": {}, "tensors": []}), write_content_size=False),
        _raw_block_frame(msgpack.packb({"format": 1, "meta": {"p": "x" * 300}, "tensors": []}), size=7),
    ]
    refused = accepted = 0
    started = time.perf_counter()
    for _ in range(400):
        blob = _mutations(rng, rng.choice(bases))
        for expected, schema in ((None, None), (spec, GRADIENT_META)):
            try:
                decode_tensors(blob, expected=expected, meta_schema=schema)
                accepted += 1
            except PayloadError as exc:
                assert "\n" not in str(exc)
                refused += 1
    assert refused > 700 and accepted < 100
    assert time.perf_counter() - started < 30       # about a second


# ------------------------------------------------------------- meta schema

def _grad_meta(**changes: object) -> dict:
    meta: dict = {"n_samples": 64, "metrics": {"d_loss": 1.25, "g_loss": 0.75, "d_x": 0.5, "d_g_z": 0.25},
                  "skipped": 0}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not _DROP}


_DROP = object()


def test_gradient_meta_accepts_what_a_worker_sends():
    for meta in (_grad_meta(), _grad_meta(metrics={}), _grad_meta(n_samples=0, skipped=3),
                 _grad_meta(n_samples=2**31), _grad_meta(metrics={"d_loss": float("nan"), "steps": 2}),
                 _grad_meta(metrics={f"m{i}": float(i) for i in range(16)}),
                 _grad_meta(metrics={"k" * 32: -1e300})):
        assert check_meta_schema(meta, GRADIENT_META) is meta
        blob = encode_tensors({"w": torch.ones(2)}, meta=meta)
        _, got = decode_tensors(blob, meta_schema=GRADIENT_META)
        assert got.keys() == meta.keys()


@pytest.mark.parametrize("meta, reason", [
    (_grad_meta(extra=1), r"unexpected key 'extra'"),
    (_grad_meta(a=1, b=2, c=3, d=4), r"unexpected keys 'a', 'b', 'c' \(\+1 more\)"),
    (_grad_meta(skipped=_DROP), r"missing key 'skipped'"),
    ({}, r"missing keys 'metrics', 'n_samples', 'skipped'"),
    (_grad_meta(n_samples="64"), r"key 'n_samples' must be an int, not str"),
    (_grad_meta(n_samples=True), r"key 'n_samples' must be an int, not bool"),
    (_grad_meta(n_samples=64.0), r"key 'n_samples' must be an int, not float"),
    (_grad_meta(n_samples=-1), r"key 'n_samples' is -1, outside 0..2147483648"),
    (_grad_meta(n_samples=2**31 + 1), r"key 'n_samples' is 2147483649, outside"),
    (_grad_meta(skipped=-5), r"key 'skipped' is -5, outside"),
    (_grad_meta(skipped=None), r"key 'skipped' must be an int, not NoneType"),
    (_grad_meta(metrics=[1.0]), r"key 'metrics' must be a map, not list"),
    (_grad_meta(metrics=None), r"key 'metrics' must be a map, not NoneType"),
    (_grad_meta(metrics={f"m{i}": 0.0 for i in range(17)}), r"key 'metrics' has 17 entries, more than 16"),
    (_grad_meta(metrics={"k" * 33: 0.0}), r"key 'metrics' has a key of 33 characters, more than 32"),
    (_grad_meta(metrics={"d_loss": "x"}), r"key 'metrics' entry 'd_loss' must be a number, not str"),
    (_grad_meta(metrics={"d_loss": True}), r"entry 'd_loss' must be a number, not bool"),
    (_grad_meta(metrics={"d_loss": [1.0]}), r"entry 'd_loss' must be a number, not list"),
    (_grad_meta(metrics={"d_loss": {"x": 1.0}}), r"entry 'd_loss' must be a number, not dict"),
    (_grad_meta(metrics={"d_loss": float("inf")}), r"entry 'd_loss' is inf, which is not allowed"),
    (_grad_meta(metrics={"g_loss": float("-inf")}), r"entry 'g_loss' is -inf, which is not allowed"),
])
def test_gradient_meta_refuses(meta, reason):
    with pytest.raises(PayloadError, match=reason):
        check_meta_schema(meta, GRADIENT_META)
    blob = encode_tensors({"w": torch.ones(2)}, meta=meta)
    with pytest.raises(PayloadError, match=reason):
        decode_tensors(blob, meta_schema=GRADIENT_META)
    decode_tensors(blob)                 # without a schema any plain meta still passes


def test_meta_schema_errors_never_echo_hostile_strings():
    huge = "A" * 60_000
    for meta in (_grad_meta(**{huge: 1}), _grad_meta(metrics={huge: 1.0}), {huge: 1},
                 _grad_meta(metrics={"x" * 20 + huge: 1.0})):
        blob = encode_tensors({}, meta=meta)
        with pytest.raises(PayloadError) as exc:
            decode_tensors(blob, meta_schema=GRADIENT_META)
        message = str(exc.value)
        assert len(message) < 200 and "\n" not in message, message
        assert "A" * 100 not in message
    with pytest.raises(PayloadError, match=r"is a 70001-bit int"):
        check_meta_schema(_grad_meta(n_samples=2**70_000), GRADIENT_META)   # no str() of a huge int


def test_meta_schema_checks_the_map_itself():
    with pytest.raises(PayloadError, match="meta is a list, not a map"):
        check_meta_schema([], GRADIENT_META)
    with pytest.raises(PayloadError, match="meta key 1 is not a string"):
        check_meta_schema({1: 2}, GRADIENT_META)
    with pytest.raises(PayloadError, match="key .metrics. has a key of type int, not a string"):
        check_meta_schema(_grad_meta(metrics={1: 2.0}), GRADIENT_META)


def test_weights_meta_and_custom_schemas():
    for meta in ({}, {"step": 0}, {"step": 12345}):
        blob = encode_tensors({"w": torch.ones(2)}, meta=meta)
        assert decode_tensors(blob, meta_schema=WEIGHTS_META)[1] == meta
    for meta, reason in (({"step": -1}, "outside 0.."), ({"step": "3"}, "must be an int"),
                         ({"n_samples": 3}, "unexpected key 'n_samples'")):
        with pytest.raises(PayloadError, match=reason):
            decode_tensors(encode_tensors({}, meta=meta), meta_schema=WEIGHTS_META)
    empty = MetaSchema()
    assert check_meta_schema({}, empty) == {}
    with pytest.raises(PayloadError, match="unexpected key 'x'"):
        check_meta_schema({"x": 1}, empty)
    custom = MetaSchema(required={"name": Text(8), "lr": Number()},
                        optional={"tags": MapOf(Int(hi=9), max_items=2, max_key_len=4)})
    check_meta_schema({"name": "adam", "lr": 2e-4}, custom)
    check_meta_schema({"name": "adam", "lr": 1, "tags": {"a": -3, "b": 9}}, custom)
    for meta, reason in (({"name": "x" * 9, "lr": 1.0}, "'name' is 9 characters long, more than 8"),
                         ({"name": 3, "lr": 1.0}, "'name' must be a string, not int"),
                         ({"name": "a", "lr": math.nan}, "'lr' is NaN, which is not allowed"),
                         ({"name": "a", "lr": 1.0, "tags": {"a": 10}}, "entry 'a' is 10, outside ..9")):
        with pytest.raises(PayloadError, match=reason):
            check_meta_schema(meta, custom)
    with pytest.raises(ValueError, match="both required and optional"):
        MetaSchema(required={"a": Int()}, optional={"a": Int()})
    with pytest.raises(TypeError, match="not Int, Number, Text or MapOf"):
        MetaSchema(required={"a": int})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="not Int, Number, Text or MapOf"):
        MetaSchema(required={"a": MapOf(str, 1, 1)})  # type: ignore[arg-type]
