"""What a model takes and returns: :class:`ModelSpec`, the input side of the model contract
(size, channels, normalisation, how a photo becomes that input) and the output side
(classes or an embedding). Checkpoints store it; the fingerprint hashes it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, Union

OutputKind = Literal["classification", "embedding"]
PerChannel = Union[float, tuple[float, ...]]
# How a photo becomes (height, width): see ModelSpec.resize.
ResizeMode = Literal["squash", "center_crop", "pad"]
RESIZE_MODES = ("squash", "center_crop", "pad")
Interpolation = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]
INTERPOLATIONS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


class ModelError(ValueError):
    """A model cannot be loaded or does not honour the contract; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model takes and returns.

    Pixels reach ``apply`` as ``(uint8 * scale + offset - mean) / std`` in float32, shape
    ``(batch, height, width, channels)``; channels is 1 (grayscale) or 3 (RGB). ``mean`` and
    ``std`` are one number or one per channel, in the units after ``scale``/``offset`` (so the
    usual ImageNet values work with the default ``scale=1/255``).

    How a decoded photo (EXIF orientation applied first) becomes ``height x width``:

    - ``resize="squash"`` (default): stretched to exactly ``height x width``;
    - ``resize="center_crop"``: scaled, keeping its aspect ratio, to just cover the box
      ``floor(width / crop_fraction) x floor(height / crop_fraction)`` (the side that needs
      the larger scale gets exactly the box's side, the other ``int(box side * long /
      short)``), then the center ``height x width`` is cropped at offsets
      ``round((resized - target) / 2)`` (Python's round: halves to even). For a square
      target this is exactly torchvision's eval transform ``Resize(floor(224 / 0.875) = 256)``
      + ``CenterCrop(224)`` on a PIL image, as ResNet and ViT evaluation do (CLIP:
      ``crop_fraction=1``). An image so elongated that the resized whole would exceed 8x the
      output's pixels is cropped before resampling instead: the same geometry, but Pillow's
      float32 box may round differently (a level with smooth filters; nearest may take the
      neighbouring pixel where a sample falls exactly between two);
    - ``resize="pad"``: scaled, keeping its aspect ratio, to fit inside ``height x width``,
      and centered on a ``pad_value`` background (letterboxing): Pillow's
      ``ImageOps.pad(img, (width, height), filter, color=pad_value)``, except that the
      scaled short side is at least 1 pixel.

    ``interpolation`` is Pillow's resampling filter (Pillow antialiases when it shrinks).
    JPEGs may be decoded at 1/2, 1/4 or 1/8 scale first, only where that keeps the result
    within ``pipeline.resize.DRAFT_TOLERANCE`` of a full decode (never for nearest or box).
    """

    height: int
    width: int
    channels: int
    class_names: tuple[str, ...] = ()
    output: OutputKind = "classification"
    embedding_dim: int | None = None
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    mean: PerChannel = 0.0
    std: PerChannel = 1.0
    resize: ResizeMode = "squash"
    crop_fraction: float = 0.875  # center_crop only: crop side / resized side (224 / 256)
    interpolation: Interpolation = "bilinear"
    pad_value: int = 0  # pad only: the background's uint8 value, every channel

    def __post_init__(self) -> None:
        problems = []
        if min(self.height, self.width) < 1:
            problems.append(f"height/width must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.output not in ("classification", "embedding"):
            problems.append(f"output must be 'classification' or 'embedding', got {self.output!r}")
        if self.output == "classification" and not self.class_names:
            problems.append("a classification model needs class_names")
        if self.output == "embedding" and not (self.embedding_dim or 0) > 0:
            problems.append("an embedding model needs a positive embedding_dim")
        if isinstance(self.class_names, str):
            problems.append("class_names must be a sequence of names, not one string")
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if not (isinstance(self.crop_fraction, numbers.Real) and 0 < self.crop_fraction <= 1):
            problems.append(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if not (isinstance(self.pad_value, numbers.Integral) and 0 <= self.pad_value <= 255):
            problems.append(f"pad_value must be an integer in 0..255, got {self.pad_value!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            values = value if isinstance(value, (tuple, list)) else (value,)
            if isinstance(value, (tuple, list)) and len(value) not in (1, self.channels):
                problems.append(f"{name} needs 1 or {self.channels} values, got {len(value)}")
            elif not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
                problems.append(f"{name} must be finite numbers, got {value!r}")
            elif name == "std" and any(v == 0 for v in values):
                problems.append("std must not be 0")
            elif isinstance(value, list):  # frozen and hashable, like the rest of the spec
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if problems:
            raise ModelError("Invalid model spec: " + "; ".join(problems) + ".")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def output_dim(self) -> int:
        return len(self.class_names) if self.output == "classification" else int(self.embedding_dim)

    def normalise(self, images: Any) -> Any:
        """uint8 (B, H, W, C) -> the float32 input ``apply`` expects. Jittable."""
        import jax.numpy as jnp

        x = images.astype(jnp.float32) * self.scale + self.offset
        if self.mean != 0.0 or self.std != 1.0:
            x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        return x

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
