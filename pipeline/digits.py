"""scikit-learn's bundled digits as images: the training data and the demo's sample data.

Convention: dark ink on a light background, ``gray = 255 - value * 255 / 16``. The first
1,500 digits (in the set's order) are for training; the last 297 are held out.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_COUNT = 1500
RESAMPLERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def load_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train 8x8 values, labels), (held-out values, labels)); values are 0..16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.astype(np.float32), digits.target.astype(np.int32)  # (1797, 8, 8)
    return (x[:TRAIN_COUNT], y[:TRAIN_COUNT]), (x[TRAIN_COUNT:], y[TRAIN_COUNT:])


def to_gray(values: np.ndarray) -> np.ndarray:
    """0..16 ink values (8, 8) -> uint8 gray, dark ink on light background."""
    return np.clip(255.0 - values * (255.0 / 16.0), 0, 255).round().astype(np.uint8)


def render(values: np.ndarray, size: int, resample: str = "bilinear", rgb: bool = False) -> Image.Image:
    """One digit as a ``size`` x ``size`` Pillow image."""
    img = Image.fromarray(to_gray(values), "L").resize((size, size), RESAMPLERS[resample])
    return img.convert("RGB") if rgb else img


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def model_inputs(values: np.ndarray, spec, size: int = 32) -> np.ndarray:
    """Digits (N, 8, 8) -> (N, H, W, C) uint8 model inputs, rendered at ``size`` px as PNG and
    decoded by the pipeline's own decode."""
    from pipeline.decode import decode_image

    return np.stack([decode_image(encode(render(v, size), "PNG"), spec) for v in values])


def write_samples(directory: str | Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` held-out digits as ``DIR/<label>/<name>.<ext>``: sizes 16..128, PNG or
    JPEG, gray or RGB, nearest or bilinear. Returns the files written."""
    _, (x, y) = load_split()
    rng = np.random.default_rng(seed)
    root = Path(directory)
    written = []
    for i in range(count):
        j = i % len(x)
        size = int(rng.integers(16, 129))
        resample = ("nearest", "bilinear")[int(rng.integers(2))]
        rgb = bool(rng.integers(2))
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[int(rng.integers(2))]
        img = render(x[j], size, resample, rgb)
        path = root / str(int(y[j])) / f"digit_{i:05d}_{size}px_{resample}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(img, fmt))
        written.append(path)
    return written
