"""Payload codec: named tensors <-> a zstd-compressed msgpack blob.

Weights and gradients travel between workers as PostgreSQL ``bytea`` blobs, so
anything that can write to the database can hand a worker a payload.  That is
why this codec never uses pickle (unpickling runs arbitrary code) and why
decoding treats every blob as hostile: it must be exactly one complete zstd
frame whose decompressed size stays under a cap (checked against the header
before any buffer is sized, and enforced by libzstd while decoding), every
field is type-checked, shapes are checked against byte lengths and, when the
caller knows them, against the expected parameter shapes, ``meta`` can be held
to a fixed schema (:data:`GRADIENT_META`), and NaN/Inf values are refused
before they can poison a model.

Wire format (``FORMAT_VERSION`` 1), zstd-compressed::

    {"format": 1,
     "meta": {...plain msgpack values...},
     "tensors": [[name, dtype, shape, raw_bytes], ...]}

``dtype`` is ``"f32"``, ``"bf16"`` or ``"i64"``; ``raw_bytes`` is the
C-contiguous little-endian buffer (bf16 as the 16-bit pattern of each value).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from ganns_async.errors import PayloadError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "GRADIENT_META",
    "WEIGHTS_META",
    "Int",
    "MapOf",
    "MetaField",
    "MetaSchema",
    "Number",
    "Text",
    "check_meta_schema",
    "decode_tensors",
    "encode_tensors",
    "spec_budget",
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
# "zstd decompress error: ", "decompression error: ", "cannot get frame parameters: " ...
_ZSTD_ERROR_PREFIX = re.compile(r"^(?:[a-z ]*(?:error|parameters): )+")


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


# -------------------------------------------------------------- meta schema
#
# _check_meta only says that ``meta`` is plain data.  A caller that knows what a
# blob of its kind carries passes a MetaSchema as well, so that a hostile sender
# cannot slip in extra keys, leave keys out, or hand over a 10,000-entry
# "metrics" map or a string where a count belongs.

@dataclass(frozen=True)
class Int:
    """An int (never a bool) with ``lo <= value <= hi``; ``None`` leaves that side open."""

    lo: int | None = None
    hi: int | None = None


@dataclass(frozen=True)
class Number:
    """An int or float (never a bool); NaN and +-Inf only where allowed."""

    allow_nan: bool = False
    allow_inf: bool = False


@dataclass(frozen=True)
class Text:
    """A string of at most ``max_len`` characters."""

    max_len: int


@dataclass(frozen=True)
class MapOf:
    """A map of at most ``max_items`` string keys, each at most ``max_key_len``
    characters, to values that all match ``value``."""

    value: MetaField
    max_items: int
    max_key_len: int


MetaField = Int | Number | Text | MapOf
"""What one meta value may be; see :class:`MetaSchema`."""


@dataclass(frozen=True, eq=False)
class MetaSchema:
    """The exact shape of a blob's ``meta`` map.

    Every key of ``required`` must be present, keys of ``optional`` may be,
    and no other key is allowed; each value must match its field.  An empty
    schema (``MetaSchema()``) allows only an empty meta.  Check a decoded meta
    with :func:`check_meta_schema`, or pass ``meta_schema=`` to
    :func:`decode_tensors`.
    """

    required: Mapping[str, MetaField] = field(default_factory=dict)
    optional: Mapping[str, MetaField] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.required) & set(self.optional)
        if both:
            raise ValueError(f"meta schema keys both required and optional: {sorted(both)}")
        for key, spec in [*self.required.items(), *self.optional.items()]:
            if not isinstance(key, str):
                raise TypeError(f"meta schema keys must be str, not {type(key).__name__}")
            _check_field(spec, key)
        object.__setattr__(self, "required", MappingProxyType(dict(self.required)))
        object.__setattr__(self, "optional", MappingProxyType(dict(self.optional)))


def _check_field(spec: object, key: str) -> None:
    """Catch a malformed schema when it is built, not when the first blob arrives."""
    if isinstance(spec, MapOf):
        _check_field(spec.value, key)
    elif not isinstance(spec, (Int, Number, Text)):
        raise TypeError(f"meta schema field {key!r} is a {type(spec).__name__}, not Int, Number, Text or MapOf")


_MAX_SAMPLES = 2**31

GRADIENT_META = MetaSchema(required={
    "n_samples": Int(0, _MAX_SAMPLES),
    "skipped": Int(0, _MAX_SAMPLES),
    "metrics": MapOf(Number(allow_nan=True), max_items=16, max_key_len=32),
})
"""The meta of a worker's gradient blob (``Worker._compute``): how many images the
unit used, how many it had to skip, and up to 16 named losses/scores, each finite
or NaN (a metric with nothing to average over)."""

WEIGHTS_META = MetaSchema(optional={"step": Int(0, 2**63 - 1)})
"""The meta of a weights broadcast: the step it belongs to, or nothing at all."""


def _type_name(value: object) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _show_int(value: int) -> str:
    # str() of a huge int is slow, and refused past 4300 digits.
    return str(value) if value.bit_length() <= 128 else f"a {value.bit_length()}-bit int"


def _check_value(value: Any, spec: MetaField, where: str) -> None:
    if isinstance(spec, Int):
        if not _is_int(value):
            raise PayloadError(f"payload meta {where} must be an int, not {_type_name(value)}")
        if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
            lo = "" if spec.lo is None else spec.lo
            hi = "" if spec.hi is None else spec.hi
            raise PayloadError(f"payload meta {where} is {_show_int(value)}, outside {lo}..{hi}")
    elif isinstance(spec, Number):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PayloadError(f"payload meta {where} must be a number, not {_type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value) and not spec.allow_nan:
                raise PayloadError(f"payload meta {where} is NaN, which is not allowed here")
            if math.isinf(value) and not spec.allow_inf:
                raise PayloadError(f"payload meta {where} is {value}, which is not allowed here")
    elif isinstance(spec, Text):
        if not isinstance(value, str):
            raise PayloadError(f"payload meta {where} must be a string, not {_type_name(value)}")
        if len(value) > spec.max_len:
            raise PayloadError(f"payload meta {where} is {len(value)} characters long, more than {spec.max_len}")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise PayloadError(f"payload meta {where} must be a map, not {_type_name(value)}")
        if len(value) > spec.max_items:
            raise PayloadError(f"payload meta {where} has {len(value)} entries, more than {spec.max_items}")
        for key, item in value.items():
            if not isinstance(key, str):
                raise PayloadError(f"payload meta {where} has a key of type {_type_name(key)}, not a string")
            if len(key) > spec.max_key_len:
                raise PayloadError(f"payload meta {where} has a key of {len(key)} characters, more than "
                                   f"{spec.max_key_len}: {_short(key, 40)}")
            _check_value(item, spec.value, f"{where} entry {_short(key, 40)}")
    else:  # pragma: no cover - MetaSchema refuses other fields when it is built
        raise TypeError(f"unknown meta schema field {spec!r}")


def check_meta_schema(meta: Any, schema: MetaSchema) -> dict[str, Any]:
    """Check a decoded ``meta`` against ``schema``; return it unchanged if it fits.

    Missing keys, unknown keys, wrong types, out-of-range ints, too many or too
    long map keys, and NaN/Inf where the field does not allow them raise
    :class:`~ganns_async.errors.PayloadError` with a one-line message that
    names the key (cut short: a hostile key is never echoed in full).
    """
    if not isinstance(meta, dict):
        raise PayloadError(f"payload meta is a {_type_name(meta)}, not a map")
    for key in meta:
        if not isinstance(key, str):
            raise PayloadError(f"payload meta key {_short(key)} is not a string")
    unknown = [k for k in meta if k not in schema.required and k not in schema.optional]
    if unknown:
        word = "key" if len(unknown) == 1 else "keys"
        raise PayloadError(f"payload meta has unexpected {word} {_names(unknown, limit=3)}")
    missing = [k for k in schema.required if k not in meta]
    if missing:
        word = "key" if len(missing) == 1 else "keys"
        raise PayloadError(f"payload meta is missing {word} {_names(missing, limit=3)}")
    for key, value in meta.items():
        spec = schema.required[key] if key in schema.required else schema.optional[key]
        _check_value(value, spec, f"key {_short(key, 40)}")
    return meta


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

def _frame_error(exc: zstandard.ZstdError) -> str:
    """libzstd's reason for refusing a frame, as one short line."""
    lines = str(exc).splitlines()
    text = _ZSTD_ERROR_PREFIX.sub("", lines[0]) if lines else ""
    return text[:80] or "error"


def _decompress_frame(blob: bytes, max_bytes: int) -> bytes:
    """Decompress exactly one complete zstd frame of at most ``max_bytes`` bytes.

    Everything per block happens inside libzstd, so a frame of a million tiny
    blocks costs no more Python than a frame of one:

    * the frame header is parsed by ``zstandard.get_frame_parameters``; a
      declared content size over the cap, or over what a frame of this many
      bytes can hold at all, is refused before any buffer is sized from it;
    * a frame with a content size (the encoder always writes one) is decoded
      by one ``ZstdDecompressor.decompress`` call into a buffer of exactly that
      size, with ``allow_extra_data=False``: a truncated frame, a frame holding
      more than it declares, a checksum mismatch, trailing bytes and a second
      frame are all libzstd errors, told apart afterwards by :func:`_diagnose`;
    * a frame without one (foreign or hostile) is first streamed under the
      cap, counting and dropping 1 MiB pieces, so a bomb stops after at most
      the cap's worth of work and one piece of memory; only then is it decoded
      by a ``decompressobj``, whose ``eof`` and ``unused_data`` say whether the
      frame was complete and alone (python-zstandard's ``allow_extra_data``
      is not honoured for such frames).

    The decoder's window is limited too, so a hostile header cannot make it
    reserve a huge history buffer.
    """
    if len(blob) < 4 or blob[:4] != _ZSTD_MAGIC:
        raise PayloadError("payload is not zstd-compressed (bad magic number)")
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        if "not enough data" in str(exc):
            raise PayloadError("payload is truncated (zstd frame header incomplete)") from None
        raise PayloadError(f"payload is corrupt (zstd frame header: {_frame_error(exc)})") from None
    if params.dict_id:
        raise PayloadError("payload needs a zstd dictionary, which this format never uses")
    dctx = zstandard.ZstdDecompressor(max_window_size=_window_limit(max_bytes))
    declared = params.content_size
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        return _decompress_unsized(dctx, blob, max_bytes)
    if declared > max_bytes:
        raise PayloadError(f"payload declares {declared} decompressed bytes, over the cap of {max_bytes}")
    # Every zstd block (at most 128 KiB) costs at least 4 bytes (an RLE block), so a
    # frame cannot expand more than this: a lying header gets no buffer bigger than
    # the blob's own size allows.
    if declared > len(blob) * (zstandard.BLOCKSIZE_MAX // 4):
        raise PayloadError(f"payload is corrupt (declares {declared} bytes, more than "
                           f"{len(blob)} compressed bytes can hold)")
    if declared == 0:
        # python-zstandard returns b"" for a declared size of 0 without reading on.
        raise PayloadError("payload is not valid msgpack (the zstd frame is empty)")
    try:
        return dctx.decompress(blob, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise _diagnose(blob, dctx, declared, exc) from None


def _window_limit(max_bytes: int) -> int:
    return min(_ZSTD_DEFAULT_WINDOW_MAX, max(_ZSTD_MIN_WINDOW_LIMIT, max_bytes))


def _stream_count(dctx: zstandard.ZstdDecompressor, blob: bytes, limit: int) -> int:
    """Bytes the first frame streams out, counted up to ``limit + 1`` and dropped as
    they come: time bounded by ``limit``, memory by one ``_READ_CHUNK``.  A
    truncated frame counts short.  Raises ``zstandard.ZstdError``."""
    produced = 0
    with dctx.stream_reader(blob) as reader:
        while produced <= limit:
            chunk = reader.read(min(_READ_CHUNK, limit + 1 - produced))
            if not chunk:
                break
            produced += len(chunk)
    return produced


def _decompress_unsized(dctx: zstandard.ZstdDecompressor, blob: bytes, max_bytes: int) -> bytes:
    """A frame whose header gives no content size: bound it by streaming, then decode it."""
    try:
        produced = _stream_count(dctx, blob, max_bytes)
    except zstandard.ZstdError:
        # Corrupt, or junk after the frame (the reader trips on it once the frame's
        # output, within the cap, is out): the decompressobj below decodes the same
        # frame, fails at the same point, and says which.
        pass
    else:
        if produced > max_bytes:
            raise PayloadError(f"payload decompresses to more than the cap of {max_bytes} bytes")
    dobj = dctx.decompressobj()
    try:
        out = dobj.decompress(blob)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"payload is corrupt (zstd: {_frame_error(exc)})") from None
    if len(out) > max_bytes:   # cannot happen after the count; kept as a guard
        raise PayloadError(f"payload decompresses to more than the cap of {max_bytes} bytes")
    if not dobj.eof:
        raise PayloadError("payload is truncated (zstd frame incomplete)")
    if dobj.unused_data:
        raise PayloadError(f"payload has {len(dobj.unused_data)} trailing bytes after the zstd frame")
    return out


def _diagnose(blob: bytes, dctx: zstandard.ZstdDecompressor, declared: int,
              exc: zstandard.ZstdError) -> PayloadError:
    """Why the one-shot decode of a frame declaring ``declared`` bytes failed: trailing
    data, truncated, or corrupt.  Only refused blobs get here, and the stream that tells
    a truncated frame from one holding more than it declares stops past ``declared``."""
    message = str(exc)
    if "unused data" in message:
        found = re.search(r"(\d+) bytes of unused data", message)
        count = f"{found.group(1)} " if found else ""
        return PayloadError(f"payload has {count}trailing bytes after the zstd frame")
    if "did not decompress full frame" not in message:
        return PayloadError(f"payload is corrupt (zstd: {_frame_error(exc)})")
    try:
        produced = _stream_count(dctx, blob, declared)
    except zstandard.ZstdError as again:
        return PayloadError(f"payload is corrupt (zstd: {_frame_error(again)})")
    if produced > declared:
        return PayloadError(f"payload is corrupt (the zstd frame holds more than the {declared} "
                            "bytes its header declares)")
    return PayloadError("payload is truncated (zstd frame incomplete)")


def _unpack(data: bytes) -> Any:
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
                   max_bytes: int = DEFAULT_MAX_BYTES, meta_schema: MetaSchema | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode a blob from :func:`encode_tensors`, trusting nothing in it.

    Returns ``(tensors, meta)``: floating tensors as float32, integer ones as
    int64, all on the CPU and owning their memory.  ``expected`` (see
    :func:`tensor_spec`) makes missing, extra, misshapen or wrongly typed
    tensors an error here rather than a confusing failure in
    ``load_state_dict`` or, worse, a silent broadcast.  ``max_bytes`` caps the
    decompressed size.  ``meta_schema`` (e.g. :data:`GRADIENT_META`) fixes the
    keys and value types of ``meta``; without it any plain data passes.  Any
    problem with the blob raises
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
    doc = _unpack(_decompress_frame(blob, max_bytes))

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
    if meta_schema is not None:
        check_meta_schema(meta, meta_schema)
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
        # numpy's isfinite is about 10x faster than torch's on a CPU tensor (4.5 vs 56 ms for
        # 6.3M floats), and this check was two thirds of decoding. Decoded floats are float32.
        if t.is_floating_point() and not bool(np.isfinite(t.numpy()).all()):
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
