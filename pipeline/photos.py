"""Photo-like test images: what users feed the pipeline, made up, for tests and benchmarks.

The digits are not photos: a few flat strokes compress to a few hundred bytes and decode in no
time, so they say nothing about decode cost or about how a resize filter treats real detail.
These images have what photos have and JPEG is tuned for: smooth gradients (sky, walls),
overlapping objects whose edges range from sharp to blurred (depth of field), texture on some
of them, and sensor grain. Measured (Pillow 13, 200 images): a 480x360 JPEG at quality 85
takes ~6 ms of one core to make and write, and its median size is 29 KB (10th-90th percentile
20-39 KB), like a web photo of that size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# EXIF orientation tag and, for each value, the transpose that makes stored pixels of an
# upright photo (so that applying the tag, as cameras expect viewers to, gives it back).
ORIENTATION = 0x0112
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
_DETAIL = (0, 0, 8, 16, 32, 40)  # texture amplitude choices (x 1/64 of +-64 levels)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photo-like RGB image of ``width`` x ``height``."""
    # Objects are drawn at half size and scaled up (4x less work; edges then blur over about
    # 2 px, as in a downscaled camera image), texture and grain at full size.
    half = (max(1, (width + 1) // 2), max(1, (height + 1) // 2))
    scene = _smooth(rng, *half, cells=int(rng.integers(2, 5)))
    # How much fine texture each region carries (foliage, fabric) vs none (sky, walls).
    detail = Image.new("L", half, int(rng.choice(_DETAIL)))
    for _ in range(int(rng.integers(6, 14))):
        _add_shape(rng, scene, detail)
    scene = scene.resize((width, height), Image.Resampling.BILINEAR)
    detail = detail.resize((width, height), Image.Resampling.NEAREST)
    # Texture and grain on luminance only: chroma noise is not photo-like and would make
    # the JPEG far bigger than a photo of that size. (Random bytes: the fastest noise.)
    fine = np.frombuffer(rng.bytes(half[0] * half[1]), np.uint8).reshape(half[::-1]) // 2 + 64
    fine = Image.fromarray(fine, "L").resize((width, height), Image.Resampling.BILINEAR)
    grain = np.frombuffer(rng.bytes(width * height), np.uint8).reshape(height, width) % 5
    luma = (np.asarray(fine, np.int16) - 128) * np.asarray(detail, np.int16) // 64  # (H, W)
    luma += grain + 126  # 128 + grain in -2..2
    luma = Image.fromarray(np.clip(luma, 0, 255).astype(np.uint8), "L")
    return ImageChops.add(scene, Image.merge("RGB", (luma, luma, luma)), offset=-128)


def write_photos(
    directory: str | Path, count: int, size: tuple[int, int] = (480, 360), quality: int = 85,
    seed: int = 0, *, rotated: float = 0.0, png: float = 0.0, start: int = 0,
) -> list[Path]:
    """Write ``count`` photo-like images of ``size`` (width, height) to ``directory``.

    JPEGs at ``quality``; a fraction ``png`` are PNGs instead and a fraction ``rotated`` of the
    JPEGs carry an EXIF orientation (2..8) with their pixels stored so that applying it gives
    the upright photo (named ``photo_NNNNN_oK.jpg``). Deterministic for a seed; image ``i``
    depends only on ``(seed, i)``, so images ``start .. start + count - 1`` written apart (in
    parallel) are those one call writes. Returns the paths written, in order.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(start, start + count):
        rng = np.random.default_rng((seed, i))
        img = photo(rng, *size)
        kind = rng.random()
        if kind < png:
            path = root / f"photo_{i:05d}.png"
            data = _encode(img, "PNG")
        elif kind < png + rotated * (1 - png):
            orientation = int(rng.integers(2, 9))
            path = root / f"photo_{i:05d}_o{orientation}.jpg"
            data = oriented(img, orientation, quality=quality)
        else:
            path = root / f"photo_{i:05d}.jpg"
            data = _encode(img, "JPEG", quality=quality)
        path.write_bytes(data)
        written.append(path)
    return written


def oriented(upright: Image.Image, orientation: int, fmt: str = "JPEG", **options) -> bytes:
    """An image file (Pillow's ``fmt``, e.g. JPEG, HEIF, AVIF) whose EXIF orientation is
    ``orientation`` (1..8) and whose stored pixels are ``upright`` turned so that applying the
    orientation gives ``upright`` back. (pillow-heif moves the orientation into the HEIF's own
    rotation and mirroring, which is where a phone puts it.)"""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored = upright.transpose(_STORE[orientation]) if orientation in _STORE else upright
    return _encode(stored, fmt, exif=exif.tobytes(), **options)


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _smooth(rng: np.random.Generator, width: int, height: int, cells: int) -> Image.Image:
    """Muted random colours on a coarse grid, upsampled: smooth gradients."""
    gh = max(2, min(height, round(cells * height / width)))
    colours = rng.integers(0, 256, (gh, max(2, cells), 3)).astype(np.float32)  # (gh, gw, 3)
    # Pull towards a common tone: photos are rarely saturated rainbows.
    tone = rng.uniform(40, 215, 3).astype(np.float32)
    colours = (tone + (colours - tone) * rng.uniform(0.3, 0.6)).astype(np.uint8)
    return Image.fromarray(colours, "RGB").resize((width, height), Image.Resampling.BILINEAR)


def _add_shape(rng: np.random.Generator, scene: Image.Image, detail: Image.Image) -> None:
    """Paste one ellipse, rectangle or polygon with its own gradient fill, texture amount
    and a sharp or blurred edge onto ``scene`` and ``detail``, in place."""
    width, height = scene.size
    w = int(rng.integers(max(2, width // 10), max(3, width * 2 // 3)))
    h = int(rng.integers(max(2, height // 10), max(3, height * 2 // 3)))
    x0 = int(rng.integers(-w // 3, max(1, width - w * 2 // 3)))
    y0 = int(rng.integers(-h // 3, max(1, height - h * 2 // 3)))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    margin = 3  # room for the blur inside the mask
    box = (margin, margin, w - 1 - margin, h - 1 - margin)
    if box[2] <= box[0] or box[3] <= box[1]:
        return
    kind = int(rng.integers(3))
    if kind == 0:
        draw.ellipse(box, fill=255)
    elif kind == 1:
        draw.rectangle(box, fill=255)
    else:
        points = [(float(rng.uniform(box[0], box[2])), float(rng.uniform(box[1], box[3])))
                  for _ in range(int(rng.integers(3, 7)))]
        draw.polygon(points, fill=255)
    blur = float(rng.choice([0.0, 0.0, 0.7, 1.5]))
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    fill = _smooth(rng, w, h, cells=int(rng.integers(2, 4)))
    scene.paste(fill, (x0, y0), mask)
    detail.paste(int(rng.choice(_DETAIL)), (x0, y0, x0 + w, y0 + h), mask)
