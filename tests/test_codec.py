"""Tests for ganns_async.codec: round trips and refusal of hostile blobs."""

from __future__ import annotations

import random
import tracemalloc
import warnings

import msgpack
import pytest
import torch
import zstandard

from ganns_async.codec import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
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
