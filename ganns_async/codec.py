"""Payload codec: named tensors <-> a zstd-compressed msgpack blob.

Weights and gradients travel between workers as PostgreSQL ``bytea`` blobs, so
anything that can write to the database can hand a worker a payload.  That is
why this codec never uses pickle (unpickling runs arbitrary code) and why
decoding treats every blob as hostile: the decompressed size is capped while
streaming, every field is type-checked, shapes are checked against byte
lengths and, when the caller knows them, against the expected parameter
shapes, and NaN/Inf values are refused before they can poison a model.

Wire format (``FORMAT_VERSION`` 1), zstd-compressed::

    {"format": 1,
     "meta": {...plain msgpack values...},
     "tensors": [[name, dtype, shape, raw_bytes], ...]}

``dtype`` is ``"f32"``, ``"bf16"`` or ``"i64"``; ``raw_bytes`` is the
C-contiguous little-endian buffer (bf16 as the 16-bit pattern of each value).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from ganns_async.errors import PayloadError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "decode_tensors",
    "encode_tensors",
    "tensor_spec",
]

FORMAT_VERSION = 1
"""Bumped on any incompatible change, so an old worker refuses a new blob loudly."""

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""Cap on the decompressed size: a DCGAN's full state is ~60 MB in fp32, so
512 MiB leaves room for larger models while stopping a zip bomb."""

# dtype tag -> (little-endian numpy dtype of the raw bytes, item size, family)
_DTYPES: dict[str, tuple[str, int, str]] = {
    "f32": ("<f4", 4, "float"),
    "bf16": ("<i2", 2, "float"),
    "i64": ("<i8", 8, "int"),
}
_FLOAT_TAGS = {"fp32": "f32", "bf16": "bf16"}
_FAMILIES = ("float", "int")

_MAX_NDIM = 32          # torch itself allows at most 64; real parameters have <= 4
_MAX_META_DEPTH = 32    # keeps the meta walk far from Python's recursion limit
_READ_CHUNK = 1 << 20   # decompress 1 MiB at a time
# msgpack lengths a real payload never comes near (about 60 tensors, shapes of <= 4 dims,
# a few meta fields). Without them a 2 KiB blob of one-byte list items unpacks into
# hundreds of millions of Python objects: tens of seconds and GiBs to decode.
_MAX_ARRAY_LEN = 4096
_MAX_MAP_LEN = 4096
_MAX_STR_LEN = 1 << 16
_SPEC_SLACK = 64 * 1024  # meta and msgpack framing on top of the tensors' own bytes
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_DEFAULT_WINDOW_MAX = 1 << 27   # libzstd's own default window limit
_ZSTD_MIN_WINDOW_LIMIT = 1 << 23     # window of zstd levels <= 19 on unsized input


class _ExtTypeRejected(Exception):
    """Raised from the msgpack ext hook; turned into a PayloadError by the caller."""


def _reject_ext(code: int, data: bytes) -> Any:
    # Extension types are how msgpack smuggles in application objects; the
    # format has none, so their presence means the blob is not ours.
    raise _ExtTypeRejected(code)


def _short(name: object, limit: int = 60) -> str:
    """repr() of a (possibly hostile) name, cut short so errors stay one line."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: set[str] | list[str], limit: int = 5) -> str:
    ordered = sorted(names)
    shown = ", ".join(_short(n) for n in ordered[:limit])
    return shown + (f" (+{len(ordered) - limit} more)" if len(ordered) > limit else "")


# --------------------------------------------------------------------- meta

def _check_meta(value: Any, *, where: str, depth: int, encoding: bool) -> None:
    """Allow only plain data in ``meta``.

    On encode this catches values that would pack but not decode (int keys,
    numpy scalars); on decode it rejects msgpack Timestamps, bytes keys and
    absurd nesting, so callers only ever see JSON-like values.
    """
    if depth > _MAX_META_DEPTH:
        raise PayloadError(f"payload meta is nested more than {_MAX_META_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list) or (encoding and isinstance(value, tuple)):
        for i, item in enumerate(value):
            _check_meta(item, where=f"{where}[{i}]", depth=depth + 1, encoding=encoding)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(f"payload meta key {_short(key)} at {_short(where)} is not a string")
            _check_meta(item, where=f"{where}.{key}"[:200], depth=depth + 1, encoding=encoding)
        return
    raise PayloadError(f"payload meta value at {_short(where)} has unsupported type {type(value).__name__}")


# ------------------------------------------------------------------- encode

def _tensor_record(name: str, tensor: torch.Tensor, float_tag: str) -> list[Any]:
    """One ``[name, dtype, shape, raw]`` entry; the tensor may live anywhere."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.layout != torch.strided:
        raise TypeError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors are supported")
    if tensor.is_complex():
        raise TypeError(f"tensor {name!r} is complex ({tensor.dtype}); not supported")
    t = tensor.detach()
    if t.is_floating_point():
        if float_tag == "bf16":
            # Round-to-nearest-even happens in .to(); ship the 16-bit patterns.
            t = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        else:
            t = t.to(device="cpu", dtype=torch.float32).contiguous()
        tag = float_tag
    else:
        # Integer and bool buffers (BatchNorm's num_batches_tracked) stay exact.
        t = t.to(device="cpu", dtype=torch.int64).contiguous()
        tag = "i64"
    np_dtype = _DTYPES[tag][0]
    raw = t.numpy().astype(np_dtype, copy=False).tobytes()
    return [name, tag, list(tensor.shape), raw]


def encode_tensors(tensors: Mapping[str, torch.Tensor], *, meta: Mapping[str, Any] | None = None,
                   float_dtype: str = "fp32", level: int = 1) -> bytes:
    """Serialise named tensors (plus plain ``meta``) to a compressed blob.

    Floating tensors are stored as ``float_dtype`` ("fp32" is exact; "bf16"
    halves the size of gradients at ~3 significant digits), integer tensors as
    int64 so buffer counters survive exactly.  Tensors may be on any device and
    non-contiguous.  ``level`` is the zstd level: 1 is fast, and float bytes
    barely compress at higher levels anyway.  The frame carries a checksum so
    a flipped bit in storage fails decoding instead of yielding wrong weights.

    Values are not checked for NaN/Inf here; :func:`decode_tensors` refuses
    them, which is where a bad payload has to be stopped in any case.
    Raises ``TypeError``/``ValueError`` for arguments the caller got wrong.
    """
    if float_dtype not in _FLOAT_TAGS:
        raise ValueError(f"float_dtype must be one of {sorted(_FLOAT_TAGS)}, not {float_dtype!r}")
    float_tag = _FLOAT_TAGS[float_dtype]
    meta_dict = dict(meta) if meta is not None else {}
    try:
        _check_meta(meta_dict, where="meta", depth=0, encoding=True)
    except PayloadError as exc:
        raise TypeError(str(exc)) from None
    records = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, not {type(name).__name__}")
        records.append(_tensor_record(name, tensor, float_tag))
    payload = msgpack.packb(
        {"format": FORMAT_VERSION, "meta": meta_dict, "tensors": records},
        use_bin_type=True,
    )
    del records
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(payload)


# ------------------------------------------------------------------- decode

def _check_zstd_frame(blob: bytes, max_bytes: int) -> None:
    """Walk the zstd frame's headers without decompressing anything.

    The streaming decoder silently returns a short result for a truncated
    frame and ignores what follows the frame, so the structure is checked
    here: exactly one complete frame, nothing after it.  A declared content
    size over the cap is refused early; an absent or smaller one proves
    nothing, and the cap is enforced again while streaming.
    """
    n = len(blob)
    if n < 6 or blob[:4] != _ZSTD_MAGIC:
        raise PayloadError("payload is not zstd-compressed (bad magic number)")
    fhd = blob[4]
    fcs_flag, single_segment = fhd >> 6, (fhd >> 5) & 1
    has_checksum, did_flag = (fhd >> 2) & 1, fhd & 3
    if (fhd >> 3) & 1:
        raise PayloadError("payload is corrupt (reserved bit set in zstd frame header)")
    if did_flag:
        raise PayloadError("payload needs a zstd dictionary, which this format never uses")
    pos = 5 + (0 if single_segment else 1)  # window descriptor
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if pos + fcs_size > n:
        raise PayloadError("payload is truncated (zstd frame header incomplete)")
    if fcs_size:
        content_size = int.from_bytes(blob[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        if content_size > max_bytes:
            raise PayloadError(f"payload declares {content_size} decompressed bytes, over the cap of {max_bytes}")
    pos += fcs_size
    while True:
        if pos + 3 > n:
            raise PayloadError("payload is truncated (zstd frame incomplete)")
        header = int.from_bytes(blob[pos:pos + 3], "little")
        last, block_type, block_size = header & 1, (header >> 1) & 3, header >> 3
        if block_type == 3:
            raise PayloadError("payload is corrupt (reserved zstd block type)")
        pos += 3 + (1 if block_type == 1 else block_size)  # RLE blocks hold one byte
        if pos > n:
            raise PayloadError("payload is truncated (zstd frame incomplete)")
        if last:
            break
    pos += 4 if has_checksum else 0
    if pos > n:
        raise PayloadError("payload is truncated (zstd checksum missing)")
    if pos != n:
        raise PayloadError(f"payload has {n - pos} trailing bytes after the zstd frame")


def _decompress_capped(blob: bytes, max_bytes: int) -> bytearray:
    """Decompress at most ``max_bytes`` (+1 to detect overflow), streaming.

    The frame header's content size is attacker-controlled, so the cap is
    enforced on what the decoder actually produces.  The decoder's window is
    limited too, so a hostile header cannot make it reserve a huge buffer.
    """
    window_limit = min(_ZSTD_DEFAULT_WINDOW_MAX, max(_ZSTD_MIN_WINDOW_LIMIT, max_bytes))
    dctx = zstandard.ZstdDecompressor(max_window_size=window_limit)
    out = bytearray()
    try:
        with dctx.stream_reader(io.BytesIO(blob)) as reader:
            while len(out) <= max_bytes:
                chunk = reader.read(min(_READ_CHUNK, max_bytes + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        reason = str(exc).removeprefix("zstd decompress error: ").splitlines()[0] if str(exc) else "error"
        raise PayloadError(f"payload is corrupt (zstd: {reason})") from None
    if len(out) > max_bytes:
        raise PayloadError(f"payload decompresses to more than the cap of {max_bytes} bytes")
    return out


def _unpack(data: bytearray) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                               max_array_len=_MAX_ARRAY_LEN, max_map_len=_MAX_MAP_LEN,
                               max_str_len=_MAX_STR_LEN, max_bin_len=len(data))
    except _ExtTypeRejected as exc:
        raise PayloadError(f"payload contains a msgpack extension type ({exc.args[0]})") from None
    except msgpack.ExtraData:
        raise PayloadError("payload has trailing garbage after the msgpack document") from None
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise PayloadError(f"payload is not valid msgpack ({reason})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_record(index: int, record: Any) -> tuple[str, str, tuple[int, ...], bytes]:
    """Type- and size-check one ``[name, dtype, shape, raw]`` entry."""
    if not isinstance(record, list) or len(record) != 4:
        raise PayloadError(f"payload tensor entry {index} is not a [name, dtype, shape, bytes] list")
    name, tag, shape, raw = record
    if not isinstance(name, str):
        raise PayloadError(f"payload tensor entry {index} has a non-string name")
    if not isinstance(tag, str) or tag not in _DTYPES:
        raise PayloadError(f"tensor {_short(name)} has unknown dtype {_short(tag)}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise PayloadError(f"tensor {_short(name)} has a shape that is not a list of ints")
    if len(shape) > _MAX_NDIM:
        raise PayloadError(f"tensor {_short(name)} has {len(shape)} dims, more than {_MAX_NDIM}")
    if any(d < 0 for d in shape):
        raise PayloadError(f"tensor {_short(name)} has a negative dim in shape {tuple(shape)}")
    if not isinstance(raw, bytes):
        raise PayloadError(f"tensor {_short(name)} data is not a byte string")
    itemsize = _DTYPES[tag][1]
    expected_len = math.prod(shape) * itemsize
    if expected_len != len(raw):
        raise PayloadError(f"tensor {_short(name)} has {len(raw)} bytes but shape {tuple(shape)} "
                           f"of {tag} needs {expected_len}")
    return name, tag, tuple(shape), raw


def _check_expected(records: list[tuple[str, str, tuple[int, ...], bytes]],
                    expected: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Compare names, shapes and dtype families with what the caller will load."""
    got = {r[0] for r in records}
    missing = set(expected) - got
    if missing:
        raise PayloadError(f"payload is missing tensors: {_names(missing)}")
    extra = got - set(expected)
    if extra:
        raise PayloadError(f"payload has unexpected tensors: {_names(extra)}")
    for name, tag, shape, _ in records:
        want_shape, want_family = expected[name]
        if want_family not in _FAMILIES:
            raise ValueError(f"expected dtype for {name!r} must be 'float' or 'int', not {want_family!r}")
        if shape != tuple(want_shape):
            raise PayloadError(f"tensor {_short(name)} has shape {shape}, expected {tuple(want_shape)}")
        family = _DTYPES[tag][2]
        if family != want_family:
            raise PayloadError(f"tensor {_short(name)} has dtype {tag} ({family}), expected {want_family}")


def _to_tensor(tag: str, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    """Build an owned, writable CPU tensor (float32 or int64) from raw bytes."""
    arr = np.frombuffer(raw, dtype=_DTYPES[tag][0])
    if tag == "bf16":
        # astype copies into native int16; the bit pattern is then bf16.
        t = torch.from_numpy(arr.astype(np.int16)).view(torch.bfloat16).to(torch.float32)
    elif tag == "f32":
        t = torch.from_numpy(arr.astype(np.float32))   # copy: never alias the blob
    else:
        t = torch.from_numpy(arr.astype(np.int64))
    return t.reshape(shape)


def decode_tensors(blob: bytes, *, expected: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode a blob from :func:`encode_tensors`, trusting nothing in it.

    Returns ``(tensors, meta)``: floating tensors as float32, integer ones as
    int64, all on the CPU and owning their memory.  ``expected`` (see
    :func:`tensor_spec`) makes missing, extra, misshapen or wrongly typed
    tensors an error here rather than a confusing failure in
    ``load_state_dict`` or, worse, a silent broadcast.  ``max_bytes`` caps the
    decompressed size.  Any problem with the blob raises
    :class:`~ganns_async.errors.PayloadError` with a one-line reason.
    """
    if not _is_int(max_bytes) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, not {max_bytes!r}")
    if isinstance(blob, (bytearray, memoryview)):
        blob = bytes(blob)   # psycopg may hand back a memoryview for bytea
    if not isinstance(blob, bytes):
        raise PayloadError(f"payload is a {type(blob).__name__}, not bytes")

    if expected is not None:
        # The model says how big an honest payload is: decompress no more than that.
        max_bytes = min(max_bytes, spec_budget(expected))
    if len(blob) > max_bytes + max_bytes // 64 + 4096:  # zstd never grows data by more
        raise PayloadError(f"payload is {len(blob)} bytes, more than a payload of this kind can be")
    _check_zstd_frame(blob, max_bytes)
    doc = _unpack(_decompress_capped(blob, max_bytes))

    if not isinstance(doc, dict):
        raise PayloadError(f"payload top level is a {type(doc).__name__}, not a map")
    version = doc.get("format")
    if not _is_int(version):
        raise PayloadError("payload has no integer 'format' field")
    if version != FORMAT_VERSION:
        raise PayloadError(f"payload format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if set(doc) != {"format", "meta", "tensors"}:
        raise PayloadError(f"payload top-level keys {_names([str(k) for k in doc])} "
                           "are not exactly format, meta, tensors")
    meta, entries = doc["meta"], doc["tensors"]
    if not isinstance(meta, dict):
        raise PayloadError("payload 'meta' is not a map")
    _check_meta(meta, where="meta", depth=0, encoding=False)
    if not isinstance(entries, list):
        raise PayloadError("payload 'tensors' is not a list")

    records = [_parse_record(i, r) for i, r in enumerate(entries)]
    del doc, entries
    seen: set[str] = set()
    for name, *_ in records:
        if name in seen:
            raise PayloadError(f"payload has duplicate tensor name {_short(name)}")
        seen.add(name)
    if expected is not None:
        _check_expected(records, expected)

    tensors: dict[str, torch.Tensor] = {}
    for name, tag, shape, raw in records:
        t = _to_tensor(tag, shape, raw)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            kind = "NaN" if n_nan else "Inf"
            raise PayloadError(f"tensor {_short(name)} contains {kind} values")
        tensors[name] = t
    return tensors, meta


def spec_budget(expected: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """The most bytes an honest payload for ``expected`` decompresses to: every tensor at
    its widest wire type (fp32 floats, int64 integers) plus names, shapes and meta."""
    total = _SPEC_SLACK
    for name, (shape, family) in expected.items():
        n = 1
        for dim in shape:
            n *= int(dim)
        total += n * (8 if family == "int" else 4) + len(name.encode()) + 16 + 9 * len(shape)
    return total


def tensor_spec(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The ``expected`` mapping for :func:`decode_tensors`, from a state dict.

    Built from the receiving model itself so the check tracks the
    architecture without a hand-kept list of shapes.
    """
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, t in state.items():
        if t.is_complex():
            raise TypeError(f"tensor {name!r} is complex ({t.dtype}); not supported")
        spec[name] = (tuple(t.shape), "float" if t.is_floating_point() else "int")
    return spec
