"""The header of a safetensors file, read as untrusted data.

It is checked at least as strictly as the safetensors library checks it when a worker loads
the file, so that an upload accepted here cannot fail there: a UTF-8 JSON object, `__metadata__`
a map of strings, each tensor a known dtype, a shape of natural numbers and two ascending
offsets, and the tensors' data laid end to end over the whole data section, with nothing
before, between or after them. Every value's type is checked before it is used: the JSON is
the uploader's.
"""

import json
import reprlib
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

from jobs.errors import InvalidParameter

MAX_HEADER_BYTES = 16 * 1024 * 1024
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
METADATA = "__metadata__"
TENSOR_KEYS = {"dtype", "shape", "data_offsets"}
# The library reads offsets and dimensions as unsigned 64-bit integers.
MAX_INT = 2**64 - 1

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = 160
_repr.maxother = 80
_repr.maxlong = 40


class Brief:
    """A value as an error message shows it: cut short, so that a megabyte-long name or a
    structure nested a thousand deep is neither echoed whole nor recursed into."""

    def __init__(self, value: Any) -> None:
        self.text = _repr.repr(value)

    def __repr__(self) -> str:
        return self.text


def loads(data: bytes | str, param: str) -> Any:
    """JSON, or a 422 naming `param`: whatever the bytes are, never another exception."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidParameter(param, "...", "JSON nested too deeply") from None
    except ValueError as exc:  # also bad UTF-8, and integers too long to convert
        raise InvalidParameter(param, "...", f"not JSON: {Brief(str(exc))!r}") from None


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _natural(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT


def _utf8(value: Any) -> bool:
    """A string the library's parser reads too: Python's also takes lone surrogates."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Repeated(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A name given twice is ambiguous, whichever copy a parser keeps: refused.
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise _Repeated(f"{Brief(name)!r} is named twice in one object of the header")
        seen.add(name)
    return dict(pairs)


def _refuse(param: str, value: Any, reason: str) -> InvalidParameter:
    return InvalidParameter(param, Brief(value), reason)


def read_header(stream: BinaryIO, size: int, param: str) -> dict[str, TensorInfo]:
    """The tensor table of the safetensors file in `stream` (`size` bytes long)."""
    refuse = partial(_refuse, param)
    head = stream.read(8)
    if len(head) < 8:
        raise refuse("...", "not a safetensors file: shorter than its header's length")
    (header_bytes,) = struct.unpack("<Q", head)
    if header_bytes > min(MAX_HEADER_BYTES, size - 8):
        raise refuse(header_bytes, "not a safetensors file: its header length is out of range")
    raw = stream.read(header_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("...", "the header is not UTF-8") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise refuse("...", "the header is nested too deeply") from None
    except _Repeated as exc:
        raise refuse("...", str(exc)) from None
    except ValueError as exc:
        raise refuse("...", f"the header is not JSON: {Brief(str(exc))!r}") from None
    if not isinstance(header, dict):
        raise refuse(header, "the header must be a JSON object")

    metadata = header.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(
        _utf8(key) and _utf8(value) for key, value in metadata.items()
    ):
        raise refuse(metadata, f"{METADATA} must map names to strings")
    tensors = {name: _tensor(param, name, entry) for name, entry in header.items()}

    data_bytes = size - 8 - header_bytes
    offset = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != offset:
            raise refuse(
                name,
                f"data_offsets {[info.start, info.end]}: the tensors' data must lie end to end, "
                f"with no gap or overlap; this one starts at byte {info.start}, not {offset}",
            )
        offset = info.end
    if offset != data_bytes:
        raise refuse(
            "...",
            f"{data_bytes - offset} bytes after the last tensor's data"
            if offset < data_bytes
            else f"the tensors' data_offsets reach past the end of the file ({offset} bytes)",
        )
    return tensors


def _tensor(param: str, name: str, entry: Any) -> TensorInfo:
    refuse = partial(_refuse, param, name)
    if not _utf8(name):
        raise refuse("a tensor's name must be UTF-8")
    # Exactly the library's keys: anything else could be read differently there (its parser
    # also stops at a nesting depth Python's accepts).
    if not isinstance(entry, dict) or set(entry) != TENSOR_KEYS:
        raise refuse("a tensor's entry must be an object of dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise refuse(f"dtype {Brief(dtype)!r} is not one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(_natural(dim) for dim in shape):
        raise refuse(f"shape {Brief(shape)!r} is not a list of natural numbers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_natural(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise refuse(f"data_offsets {Brief(offsets)!r} are not two ascending integers")
    start, end = offsets
    nbytes = 0 if 0 in shape else DTYPE_BYTES[dtype]
    for dim in shape:
        nbytes *= dim
        if nbytes > end - start:
            break  # else thousands of large dimensions multiply to millions of digits
    if nbytes != end - start:
        raise refuse(
            f"its data_offsets {[start, end]} do not hold a {dtype} tensor of shape {Brief(shape)}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)
