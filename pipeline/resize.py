"""Resize stage of decode: a decoded photo -> the model's ``height x width``, as its spec says.

:class:`pipeline.model.ModelSpec` is the contract (``resize``, ``crop_fraction``,
``interpolation``, ``pad_value``); this module is its arithmetic, copied from the code it
promises to match so that tests can compare pixel for pixel: ``center_crop`` from
torchvision's ``Resize(int)`` + ``CenterCrop`` (``int(size * long / short)``, offsets rounded
half to even), ``pad`` from Pillow's ``ImageOps.pad``.

JPEG draft: libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT domain, far cheaper than a
full decode then a resize. It is a different low-pass filter from the model's, so it is used
only while the final resize still shrinks the drafted image by at least :data:`DRAFT_MARGINS`
on each axis; then the model's filter dominates and the result stays within
:data:`DRAFT_TOLERANCE` of a full decode (see there for the measurement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from pipeline.spec import INTERPOLATIONS, ModelSpec

FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}

# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)

# Draft only while the final resize still shrinks the drafted image at least this much on each
# axis (in center_crop, counting the whole resized image, crop included), per filter; never for
# the others. Nearest picks single source pixels and box averages exactly the pixels under each
# output pixel, so any averaging before them changes their result (box at 2x: mean 0.5, 99.9th
# pct 10 levels on photos). Hamming's sharper response needs 3x to stay within tolerance on
# digits. Speed (median CPU ms per RGB decode, bilinear, draft vs full): 480x360 -> 160 is not
# drafted in any mode; 1024x768 -> 224 only in pad (1/2: 3.2 vs 5.7 ms); 2000x1500 -> 224 at
# 1/2 (squash 9.2 vs 19.2, center_crop 10.3 vs 21.2) and 1/4 in pad (6.1 vs 19.3). A 1.5x
# margin would draft 1024x768 -> 224 at 1/2 in every mode (1.9x faster) but doubles the error
# (worst image on photos: mean 1.2, 99.9th pct 10; on digits 2.2 and 17). The rule before
# this one (down to 1x the target, squash only) moved digit pixels by up to 93 levels.
DRAFT_MARGINS = {"bilinear": 2.0, "bicubic": 2.0, "lanczos": 2.0, "hamming": 3.0}
# What draft may move one decoded image: |draft - full decode| in uint8 levels, mean over the
# image and its 99.9th percentile. Measured with `python -m pipeline.bench_draft` (Pillow 13):
# photo-like JPEGs (pipeline.photos) of 11 sizes from 333x222 to 2000x1500, aspect 4:1 to 1:4,
# quality 50-95, to 32x32 .. 384x384 and 96x64, every mode, L and RGB (528-680 drafted decodes
# per filter): worst image mean 0.51 / 0.59 / 0.62 / 0.30 (bilinear / bicubic / lanczos /
# hamming), 99.9th pct 5 / 5 / 5 / 4; all pixels pooled: mean 0.12-0.17, 99.9th pct 1-2.
# 300 held-out digits rendered at 48..400 px, quality 40-95, to the bundled 32x32 gray (sharp
# edges: the hard case): worst mean 0.77 / 1.05 / 1.04 / 0.70, 99.9th pct 8 / 9 / 9 / 7.
# For an L target libjpeg also hands over its luma plane instead of RGB -> L (even undrafted,
# and for nearest and box): worst image mean 0.006, 99.9th pct 1, max 4.
DRAFT_TOLERANCE = {"mean": 1.25, "p99.9": 12.0}
# A center crop resizes the whole image, then crops (as torchvision does, to match it bit for
# bit). For an image so elongated that this intermediate would exceed this many times the
# output's pixels (a 3x500 strip, a 10:1 panorama), the crop is resampled straight from the
# source instead: the same geometry, but Pillow rounds a float32 box, so a value may differ.
MAX_INTERMEDIATE = 8


@dataclass(frozen=True)
class Layout:
    """Where the whole source image lands on the ``width x height`` output: resized to
    ``size`` (width, height), top-left corner at ``offset`` (negative where it is cropped)."""

    size: tuple[int, int]
    offset: tuple[int, int]


def layout(source: tuple[int, int], spec: ModelSpec) -> Layout:
    """The layout of an upright ``source`` (width, height) image for ``spec``."""
    if spec.resize == "center_crop":
        return _center_crop(source, (spec.width, spec.height), spec.crop_fraction)
    if spec.resize == "pad":
        return _pad(source, (spec.width, spec.height))
    return Layout((spec.width, spec.height), (0, 0))


def _center_crop(source: tuple[int, int], target: tuple[int, int], fraction: float) -> Layout:
    (sw, sh), (w, h) = source, target
    bw, bh = math.floor(w / fraction), math.floor(h / fraction)  # the box to cover
    # The axis that needs the larger scale gets exactly the box's side, the other keeps the
    # aspect ratio, rounded down: torchvision's int(size * long / short) (exact in integers).
    if bw * sh >= bh * sw:
        size = (bw, bw * sh // sw)
    else:
        size = (bh * sw // sh, bh)
    left, top = round((size[0] - w) / 2.0), round((size[1] - h) / 2.0)  # half to even
    return Layout(size, (-left, -top))


def _pad(source: tuple[int, int], target: tuple[int, int]) -> Layout:
    (sw, sh), (w, h) = source, target
    size = (w, h)  # ImageOps.contain's float arithmetic and rounding, to match it
    if sw / sh > w / h:
        size = (w, max(1, round(sh / sw * w)))
    elif sw / sh < w / h:
        size = (max(1, round(sw / sh * h)), h)
    return Layout(size, (round((w - size[0]) * 0.5), round((h - size[1]) * 0.5)))


def draft_request(plan: Layout, spec: ModelSpec, orientation: int) -> tuple[int, int] | None:
    """The size to pass ``Image.draft`` in the stored (not yet oriented) frame, or None to
    decode at full size: libjpeg then keeps both sides at least this big."""
    margin = DRAFT_MARGINS.get(spec.interpolation)
    if margin is None:
        return None
    width, height = math.ceil(plan.size[0] * margin), math.ceil(plan.size[1] * margin)
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def oriented_box(
    box: tuple[float, float, float, float], size: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """Where ``box`` of an image of ``size`` lands after ``ORIENTATIONS[orientation]``.

    A drafted image can be a fraction of a pixel larger than the source scaled (libjpeg
    rounds its size up): its last row and column are partial. ``Image.draft`` says which
    region is the source, and flips move that region away from the origin.
    """
    x0, y0, x1, y1 = box
    w, h = size
    if orientation in (2, 3):  # flips x (3 also y)
        x0, x1 = w - x1, w - x0
    if orientation in (3, 4):  # flips y
        y0, y1 = h - y1, h - y0
    if orientation == 5:  # transpose: (x, y) -> (y, x)
        return (y0, x0, y1, x1)
    if orientation == 6:  # 90 degrees clockwise: (x, y) -> (h - y, x)
        return (h - y1, x0, h - y0, x1)
    if orientation == 7:  # transverse: (x, y) -> (h - y, w - x)
        return (h - y1, w - x1, h - y0, w - x0)
    if orientation == 8:  # 90 degrees counter-clockwise: (x, y) -> (y, w - x)
        return (y0, w - x1, y1, w - x0)
    return (x0, y0, x1, y1)


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of an image of stored ``size`` once its EXIF orientation is applied."""
    return (size[1], size[0]) if orientation in _SWAPS_AXES else size


def orient(img: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation (1..8) to the pixels."""
    method = ORIENTATIONS.get(orientation)
    return img.transpose(method) if method is not None else img


def resize(
    img: Image.Image, spec: ModelSpec, plan: Layout,
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """An upright ``img`` in the target mode -> ``spec.width x spec.height`` per ``plan``.

    ``box`` is the region of ``img`` that holds the source image (a drafted JPEG's
    ``oriented_box``); the whole image when None.
    """
    target = (spec.width, spec.height)
    resample = FILTERS[spec.interpolation]
    box = box or (0.0, 0.0, float(img.width), float(img.height))
    (rw, rh), (x, y) = plan.size, plan.offset
    if rw * rh > MAX_INTERMEDIATE * target[0] * target[1]:
        # The crop's region of the resized image, in img's pixels.
        (x0, y0, x1, y1), (w, h) = box, target
        crop = (x0 + -x * (x1 - x0) / rw, y0 + -y * (y1 - y0) / rh,
                x0 + (w - x) * (x1 - x0) / rw, y0 + (h - y) * (y1 - y0) / rh)
        return img.resize(target, resample, box=crop)
    img = img.resize(plan.size, resample, box=box)
    if img.size == target:
        return img
    fill = spec.pad_value if img.mode == "L" else (spec.pad_value,) * 3
    canvas = Image.new(img.mode, target, fill)
    canvas.paste(img, (x, y))  # pad: centred; center_crop: offsets < 0 crop
    return canvas
