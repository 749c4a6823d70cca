"""Read and write ``.safetensors`` files with numpy alone: no pickle, no torch, no extra package.

The format (https://huggingface.co/docs/safetensors): 8 bytes, little-endian u64 ``N``; ``N``
bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets into the byte buffer after the header), plus an optional ``"__metadata__"`` dict of
strings; then the buffer, little-endian, C order. Like the reference implementation, the reader
refuses a buffer with holes or overlaps, so a truncated or garbled file fails here with one
sentence rather than later as a wrong-looking weight.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes  # ships with jax: numpy's missing bfloat16
import numpy as np

from pipeline.model import ModelError

# The dtypes model checkpoints use: float weights and torch's int64 BatchNorm step counters.
DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The reference implementation refuses larger headers; a bigger length is a garbled file, and
# checking first avoids reading gigabytes as JSON.
MAX_HEADER_BYTES = 100_000_000


def read(path: str | os.PathLike, keep: Callable[[str], bool] | None = None
         ) -> dict[str, np.ndarray]:
    """Every tensor in the file (those whose names ``keep`` takes, if given: a CLIP
    checkpoint's vision tower without its text tower), as a numpy array of its stored dtype
    (bf16 via ml_dtypes).

    Raises :class:`pipeline.ModelError` naming the file and the first thing wrong with it
    (too short, header not JSON, an unsupported dtype, offsets out of bounds or inconsistent).
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f, size, path)
        begin_of_data = 8 + len(header)
        entries = _parse_header(header, path)
        _check_layout(entries, size - begin_of_data, path)
        out = {}
        for name, (dtype, shape, (begin, _)) in entries.items():
            if keep is not None and not keep(name):
                continue
            f.seek(begin_of_data + begin)
            count = math.prod(shape)
            data = np.fromfile(f, dtype=dtype, count=count)  # a fresh, aligned copy
            if data.size != count:  # the file shrank between stat and read
                raise ModelError(f"Unreadable safetensors file '{path}': truncated at '{name}'.")
            out[name] = data.reshape(shape)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict saved with ``save_file``: :func:`read`, with the ``module.`` prefix
    that a DistributedDataParallel wrapper puts on every key dropped."""
    state = read(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata=None) -> Path:
    """Write ``tensors`` (dtypes in :data:`DTYPES`) as a safetensors file; returns its path."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype not in _NAMES:  # big-endian arrays included: the format is little-endian
            raise ValueError(f"safetensors.write: '{name}' has unsupported dtype {arr.dtype}.")
        blob = arr.tobytes(order="C")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # writers pad so the buffer starts 8-byte aligned
    path = Path(path)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return path


def _read_header(f, size: int, path: Path) -> bytes:
    if size < 8:
        raise ModelError(
            f"Unreadable safetensors file '{path}': {size} bytes, too short for the 8-byte header "
            "length."
        )
    length = int.from_bytes(f.read(8), "little")
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise ModelError(
            f"Unreadable safetensors file '{path}': its first 8 bytes declare a {length}-byte "
            f"header but the file has {size} bytes (truncated, or not a safetensors file)."
        )
    return f.read(length)


def _parse_header(header: bytes, path: Path) -> dict[str, tuple[np.dtype, tuple, tuple]]:
    """name -> (dtype, shape, (begin, end)); every entry checked for types and size."""
    bad = f"Unreadable safetensors file '{path}'"
    try:
        raw = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{bad}: its header is not JSON ({e}).") from e
    if not isinstance(raw, dict):
        raise ModelError(f"{bad}: its header is a JSON {type(raw).__name__}, expected an object.")
    entries = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError):
            raise ModelError(
                f"{bad}: header entry '{name}' needs dtype, shape and data_offsets, got {info!r}."
            ) from None
        if dtype_name not in DTYPES:
            raise ModelError(
                f"{bad}: '{name}' has dtype {dtype_name!r}; supported: {', '.join(DTYPES)}."
            )
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise ModelError(
                f"{bad}: '{name}' needs a list of non-negative integers as shape and two as "
                f"data_offsets, got shape={shape!r}, data_offsets={offsets!r}."
            )
        dtype, (begin, end) = DTYPES[dtype_name], offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ModelError(
                f"{bad}: '{name}' ({dtype_name} {tuple(shape)}) needs {nbytes} bytes but its "
                f"data_offsets span {end - begin}."
            )
        entries[name] = (dtype, tuple(shape), (begin, end))
    return entries


def _check_layout(entries: dict, buffer_size: int, path: Path) -> None:
    """The tensors tile the buffer exactly, as the reference implementation requires."""
    bad = f"Unreadable safetensors file '{path}'"
    end_of_all = max((end for _, _, (_, end) in entries.values()), default=0)
    if end_of_all > buffer_size:
        raise ModelError(
            f"{bad}: truncated, its header describes {end_of_all} bytes of tensor data but only "
            f"{buffer_size} follow the header."
        )
    position = 0
    for name, (_, _, (begin, end)) in sorted(entries.items(), key=lambda e: e[1][2]):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise ModelError(
                f"{bad}: the data of '{name}' {what} (offset {begin}, not {position})."
            )
        position = end
    if position != buffer_size:
        raise ModelError(
            f"{bad}: {buffer_size - position} bytes after the last tensor's data are described by "
            "no header entry."
        )


def is_float(arr: np.ndarray) -> bool:
    """A float tensor, bfloat16 included (ml_dtypes' kind is "V", not "f")."""
    return arr.dtype.kind == "f" or arr.dtype == DTYPES["BF16"]


def _ints(values) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )
