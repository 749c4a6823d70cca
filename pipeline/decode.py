"""Decode stage: image bytes -> a fixed-size uint8 array, or a reason why not.

A bad image is data, not a crash: :func:`decode_rows` turns every failure into an ``error``
string on that row and a zero image, so one corrupt file never aborts the run. Training
(:mod:`pipeline.train`) goes through :func:`decode_image` too, so the model sees exactly the
pixels the pipeline will feed it.
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image

from pipeline import resize
from pipeline.crash_guard import DecodeGuard
from pipeline.platforms import error_text
from pipeline.spec import ModelSpec


def _register_heif() -> None:
    """Teach Pillow HEIF/HEIC (iPhone and many Android cameras) through pillow-heif, a
    dependency; AVIF and JPEG 2000 are Pillow's own. Without pillow-heif, a HEIF's row says
    what to install (:func:`_why_unidentified`)."""
    try:
        import pillow_heif
    except ImportError:
        return
    # One thread per decode: Ray runs one decode task per CPU, so the node's cores are busy
    # already (pillow-heif's default, 4, would put 4 threads on each). libheif applies the
    # file's rotation and mirroring itself and the plugin then reports EXIF orientation 1,
    # so the orientation step below never turns a HEIF twice.
    pillow_heif.register_heif_opener(decode_threads=1)


_register_heif()

# Refuse images whose header claims more pixels than this before decoding them: a 100 MP
# photo is real, a 40000x40000 PNG of 50 KB is a decompression bomb.
DEFAULT_MAX_PIXELS = 100_000_000


class DecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


def decode_image(
    data: bytes, spec: ModelSpec, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft: bool = True
) -> np.ndarray:
    """Bytes of any Pillow-readable image -> (height, width, channels) uint8 for ``spec``.

    EXIF orientation is applied first, then the spec's ``resize`` (see :mod:`pipeline.resize`).
    ``draft=False`` turns off JPEG draft decoding, which is otherwise used where it keeps the
    result within :data:`pipeline.resize.DRAFT_TOLERANCE` of a full decode.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    img = None
    mode = "L" if spec.channels == 1 else "RGB"
    try:
        # Pillow checks sizes itself, in Image.open and wherever it decodes a nested image
        # (an ICO decodes its PNG inside Image.open): give that check our limit (Pillow
        # refuses above twice its setting) and keep ours below as the last word.
        with warnings.catch_warnings(), _pillow_pixel_limit((max_pixels + 1) // 2):
            # Pillow warns above its setting, half our limit: only noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # the header (and, for some formats, more)
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image header claims {width}x{height} = {width * height:,} pixels, "
                    f"{_over_limit(max_pixels)}"
                )
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP/TIFF: the first frame
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            plan = resize.layout(resize.upright_size(img.size, orientation), spec)
            box = None
            if draft and img.format == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale, and straight to gray for an L
                # target, where that cannot move the result beyond the tolerance.
                drafted = img.draft(mode, resize.draft_request(plan, spec, orientation))
                if drafted is not None:
                    box = resize.oriented_box(drafted[1], img.size, orientation)
            img = resize.orient(img, orientation)
            img = _to_mode(img, mode)
            img = resize.resize(img, spec, plan, box)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as e:
        raise DecodeError(_why_unidentified(data, max_pixels)) from e
    except Image.DecompressionBombError as e:  # Pillow's check, at our limit
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise DecodeError(f"image holds {size}, {_over_limit(max_pixels)}") from e
    except _CORRUPT as e:  # the header parsed, the pixel data did not
        fmt = (img.format if img is not None else None) or next(_claimed_formats(data), "image")
        raise DecodeError(f"{fmt} data is truncated or corrupt: {type(e).__name__}: {e}") from e
    arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(spec.height, spec.width, spec.channels)  # (H, W, C) uint8


def _over_limit(max_pixels: int) -> str:
    return f"over the max_pixels limit of {max_pixels:,} (possible decompression bomb); not decoded"


@contextmanager
def _pillow_pixel_limit(limit: int):
    """Set Pillow's process-wide ``MAX_IMAGE_PIXELS`` for a block. Decode tasks run one at a
    time per process, and every caller in a run passes the same limit."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


# What Pillow's plugins raise for damaged data (zlib errors, short reads, bad chunk lengths).
_CORRUPT = (OSError, SyntaxError, EOFError, ValueError, IndexError, struct.error)


def _why_unidentified(data: bytes, max_pixels: int) -> str:
    """Pillow says only "cannot identify image file"; name the format the bytes claim to be
    and why its reader refused them (a PNG with a bad checksum, a JPEG cut after its header),
    or show the first bytes (an HTML error page saved as .jpg)."""
    for fmt in _claimed_formats(data):
        try:
            with _pillow_pixel_limit((max_pixels + 1) // 2):
                Image.OPEN[fmt][0](io.BytesIO(data), "").close()
        except Exception as e:  # we want its message, whatever the reader raises
            return f"not a readable {fmt} file: {type(e).__name__}: {e}"
    brand = data[8:12].decode("ascii", "replace") if data[4:8] == b"ftyp" else ""
    if brand in _ISO_IMAGE_BRANDS:  # an ISO media image (HEIF, AVIF) whose reader is missing
        return (f"a '{brand}' image, which this Python cannot decode: "
                f"it needs {_ISO_IMAGE_BRANDS[brand]}")
    return f"not a recognised image format (starts with {data[:16]!r})"


# The major brands of ISO base media files of images, and what decodes them.
_ISO_IMAGE_BRANDS = {
    **dict.fromkeys(
        ("heic", "heix", "hevc", "hevx", "heim", "heis", "hevm", "hevs", "mif1", "msf1"),
        "pillow-heif (pip install pillow-heif)"),
    **dict.fromkeys(("avif", "avis"), "Pillow 11.2 or later (pip install -U pillow)"),
}


def _claimed_formats(data: bytes):
    """Formats whose signature the bytes carry (readers without a signature check are left
    out: they would claim anything)."""
    Image.init()
    return (fmt for fmt, (_, accept) in Image.OPEN.items() if accept and accept(data[:16]) is True)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Any Pillow mode -> 'L' or 'RGB'. Transparency is composited onto white (the background)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = np.nanmax(arr, initial=0)
        # 16-bit data spans 0..65535; float images are usually 0..1 (scientific, HDR) or 0..255.
        peak = 65535.0 if img.mode.startswith("I;16") or top > 255 else 255.0
        if img.mode == "F" and top <= 1.0:
            peak = 1.0
        gray = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
        return gray if mode == "L" else gray.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode == mode:
        return img
    if mode == "L" and img.mode not in ("RGB", "RGBA", "1", "P"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV: via RGB
    return img.convert(mode)


def error_kind(exc: BaseException) -> str:
    """What kind of failure an error row records (``error_kind``), so a run's errors can be
    told apart at a glance: the data's (unreadable, not_an_image, corrupt, too_large, shard)
    or the system's (model_failure, model_crash, no_result, set by the later stages;
    decode_crash, a file that killed the decoding process, is the data's)."""
    kind = getattr(exc, "kind", None)
    if kind:
        return kind
    if isinstance(exc, DecodeError):
        text = str(exc)
        if "max_pixels" in text:
            return "too_large"
        if "truncated or corrupt" in text or "not a readable" in text or "no pixels" in text:
            return "corrupt"
        return "not_an_image"
    if isinstance(exc, OSError):  # missing, permission denied, not a regular file, I/O
        return "unreadable"
    return "corrupt"  # something Pillow raised from inside a decoder


def decode_rows(
    paths: list[str], loader, spec: ModelSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
    guard: DecodeGuard | None = None,
) -> dict[str, np.ndarray]:
    """Load and decode each path with ``loader(path) -> bytes``; failures become error rows.
    Columns as :func:`decode_payloads`; a row's ``_t_decode`` includes its ``loader`` call."""
    return decode_payloads(paths, (_loaded(loader, p) for p in paths), spec, max_pixels, guard)


def decode_payloads(
    paths: Sequence[str], payloads: Iterable[bytes | BaseException], spec: ModelSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS, guard: DecodeGuard | None = None,
) -> dict[str, np.ndarray]:
    """Decode each path's payload: its bytes, or the exception reading it raised (that row's
    error, as a decode failure is). ``payloads`` is aligned with ``paths`` and may be a lazy
    iterator that reads as it goes (:func:`pipeline.read.fetch_all`). ``guard`` (in a Ray
    decode task) is told of each block and file first, so that a file that kills the process
    or hangs its read or decode is found across the task's retries and becomes an error row;
    the payloads of its :meth:`~pipeline.crash_guard.DecodeGuard.deadly` files are not read.

    Returns columns ``path``, ``image`` (N, H, W, C) uint8 (zeros on error rows), ``error``
    ("" when ok: Ray Data turns an all-None column into float NaN), ``error_kind`` (see
    :func:`error_kind`; "" when ok) and ``_t_decode``: the
    seconds each row cost the caller. That is the time spent waiting for the row's payload
    plus decoding it: with reads running ahead in threads, the wait is whatever latency they
    did not hide, and the rows' seconds add up to the wall time of the loop.
    """
    n = len(paths)
    images = np.zeros((n, *spec.shape), np.uint8)  # (N, H, W, C) uint8
    errors = [""] * n
    kinds = [""] * n  # error_kind: "" when ok, like error
    seconds = np.zeros(n, np.float64)
    payloads = iter(payloads)
    if guard is not None and n:
        guard.block(paths)
    for i in range(n):
        start = time.perf_counter()
        crash = guard.row(paths[i]) if guard is not None else None  # reading is watched too
        payload = next(payloads, _END)
        if payload is _END:
            raise ValueError(f"payloads ran out at row {i} of {n}; they must align with paths")
        if guard is not None:
            guard.read()
        payload = crash or payload
        if isinstance(payload, BaseException):
            errors[i], kinds[i] = error_text(payload), error_kind(payload)
        else:
            try:
                images[i] = decode_image(payload, spec, max_pixels)
            except Exception as e:  # any failure of one file is that row's error, never the run's
                errors[i], kinds[i] = error_text(e), error_kind(e)
        if guard is not None:
            guard.decoded()
        seconds[i] = time.perf_counter() - start
    return {
        "path": np.asarray(paths, dtype=object),
        "image": images,
        "error": np.asarray(errors, dtype=object),
        "error_kind": np.asarray(kinds, dtype=object),
        "_t_decode": seconds,
    }


_END = object()


def _loaded(loader, path: str) -> bytes | BaseException:
    try:
        return loader(path)
    except Exception as e:  # the row's error, reported by decode_payloads
        return e
