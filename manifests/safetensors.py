"""The safetensors container: headers parsed, checked and encoded; tensor bytes are never copied here.

Shared by the offline stage (reading sources, writing rank files) and the runtime (mapping a rank file), so the
format's rules live in one place. No torch: the runtime's ``loaders/tensors.py`` makes tensors of the bytes.
A file is ``u64 little-endian header length | JSON header | data``; every tensor in the header names its dtype,
shape and ``[begin, end)`` byte range relative to the start of the data.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from reshard.manifests.dtypes import DTYPES, MODEL_DTYPES, nbytes
from reshard.manifests.errors import FileFormatError


def weights_dtype(dtypes_by_name: dict[str, str]) -> str | None:
    """The model dtype transformers derives from one file's tensors (``get_state_dict_dtype``, for
    ``dtype="auto"`` when config.json names none): the first floating tensor's, float8 skipped, in name order
    (the order ``safe_open(...).keys()`` gives); ``None`` when there is none to build a model in.

    Example:
        >>> weights_dtype({"model.norm.weight": "F32", "lm_head.weight": "BF16", "a.scale": "F8_E4M3"})
        'bfloat16'
    """
    floating = [name for name in sorted(dtypes_by_name) if dtypes_by_name[name] in MODEL_DTYPES]
    return MODEL_DTYPES[dtypes_by_name[floating[0]]] if floating else None


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a safetensors header describes it; ``offset`` is absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: its tensors in data order, metadata and where the data starts."""

    path: Path
    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; raise ``FileFormatError`` naming the file (and tensor) if it lies.

    Checks what a reader relies on: the file is a regular file (a FIFO would block forever), the header fits in it,
    is a JSON object with string metadata, every dtype is known, every byte range matches its shape, and the ranges
    cover the data section exactly, without overlap or gap, as the safetensors library requires. A truncated file
    fails here, before any byte is mapped.
    """
    path = Path(path)
    try:
        # Opened non-blocking so that a FIFO cannot hang us before fstat tells what it is.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return read_header_at(fd, path)
    finally:
        os.close(fd)


def read_header_at(fd: int, path: str | os.PathLike[str]) -> SafetensorsHeader:
    """``read_header`` of the file open as ``fd`` (``path`` only names it in messages and in the result).

    A caller that maps or hashes the bytes afterwards reads the header from that same descriptor: a file renamed
    over ``path`` meanwhile can then never pair this header with another file's bytes. ``file_size`` is ``fstat``'s.
    """
    path = Path(path)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileFormatError(f"{path}: not a regular file (a FIFO, device or folder), cannot be safetensors")
        file_size = info.st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise FileFormatError(f"{path}: {file_size} bytes is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise FileFormatError(
                f"{path}: header claims {header_len} bytes but the file has {file_size} "
                "(truncated, or not a safetensors file)"
            )
        raw = _pread_exactly(fd, header_len, 8)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(raw) != header_len:
        raise FileFormatError(f"{path}: truncated while its header was read ({len(raw)} of {header_len} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise FileFormatError(f"{path}: __metadata__ must be an object of strings, got a {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FileFormatError(f"{path}: __metadata__ {key!r} must be a string, got a {type(value).__name__}")
    entries: dict[str, HeaderEntry] = {}
    for name, entry in header.items():
        entries[name] = _parse_entry(path, name, entry, data_start, data_size)
    ordered = dict(sorted(entries.items(), key=lambda item: (item[1].offset, item[1].nbytes)))
    _check_coverage(path, ordered, data_start, data_size)
    return SafetensorsHeader(path, ordered, dict(metadata), data_start, file_size)


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, fewer only at the end of the file (``pread`` may return short reads)."""
    parts: list[bytes] = []
    while length > 0 and (part := os.pread(fd, length, offset)):
        parts.append(part)
        length -= len(part)
        offset += len(part)
    return b"".join(parts)


def _check_coverage(path: Path, ordered: dict[str, HeaderEntry], data_start: int, data_size: int) -> None:
    """Tensors in data order must tile the data section: each starts where the previous ended, the last ends at the
    end of the file. safetensors refuses anything else; an overlap would let two tensors alias the same bytes."""
    end, previous = 0, None
    for entry in ordered.values():
        begin = entry.offset - data_start
        if begin != end:
            where = f"overlaps {previous!r}" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise FileFormatError(
                f"{path}: tensor {entry.name!r} starts at data byte {begin} but the previous tensor ends at {end} "
                f"(it {where})"
            )
        end, previous = begin + entry.nbytes, entry.name
    if end != data_size:
        raise FileFormatError(
            f"{path}: {data_size - end} bytes after the last tensor (the data section is not fully covered)"
        )


def _parse_entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> HeaderEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise FileFormatError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise FileFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise FileFormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise FileFormatError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    try:
        expected = nbytes(dtype, shape)
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: tensor {name!r}: {exc}") from None
    if end - begin != expected or begin < 0:
        raise FileFormatError(
            f"{path}: tensor {name!r} header lies about its size: {dtype}{shape} needs {expected} bytes, "
            f"data_offsets give {end - begin}"
        )
    if end > data_size:
        raise FileFormatError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {data_start + data_size} "
            "(truncated)"
        )
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, expected)


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None, *, align: int = 8
) -> bytes:
    """Serialise a header for tensors laid out back to back in the given order, padded to 8 bytes.

    Returns the full prefix (length + JSON); the data section starts right after it. Deterministic: the same
    arguments always give the same bytes. ``align`` (a multiple of 8) pads the JSON with spaces so that the data
    section starts at a multiple of ``align`` in the file: with 64, a mapped tensor whose offset is a multiple of
    64 is as aligned as one torch allocates, and CPU kernels then take the same code path (and give the same
    bits) as on a freshly loaded copy.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, dtype, shape in tensors:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)  # for align=8 this is -len(raw) % 8
    return struct.pack("<Q", len(raw)) + raw
