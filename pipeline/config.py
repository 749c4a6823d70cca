"""The one configuration object that flows from the CLI, the Ray Job and ``pipeline.run``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pipeline.decode import DEFAULT_MAX_PIXELS

# How the input is read (pipeline/shards.py): image files, or shards holding many images.
INPUT_FORMATS = ("images", "tar", "parquet")
# JAX platforms an actor may compute on. None: "gpu" for actors that reserve GPUs, else "cpu".
PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")


class ConfigError(ValueError):
    """An option value is out of range; the message names it."""


def absolute_path(path: str) -> str:
    """``path`` made absolute, unless it is a URI (``s3://``, ``file://``)."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run needs. Defaults suit a laptop; see ``batch-infer run --help``."""

    input: str
    output: str
    model: str | None = None  # checkpoint path for the model factory; None: its default weights
    model_fn: str | None = None  # "package.module:function"; None: the bundled digits CNN
    batch_size: int = 32
    actors: int | None = None  # None: one per GPU (GPU runs) or one per node (CPU runs)
    gpus_per_actor: float = 0.0
    # None: gpu when gpus_per_actor > 0, else cpu. "cpu" with gpus_per_actor > 0 reserves GPUs
    # but computes on the CPU, on purpose: to test GPU placement on machines without GPUs.
    platform: str | None = None
    # Rows per device call, a multiple of batch_size; None: chosen by the resource plan.
    device_batch_size: int | None = None
    top_k: int = 5
    compute_dtype: str = "float32"  # or "bfloat16": cast inside the compiled program (GPU)
    logits: bool = False  # classification models: also write the raw logits (pre-softmax)
    address: str | None = None  # Ray address; None: the caller's ray.init() or a local Ray
    overwrite: bool = False
    resume: bool = False
    rows_per_file: int = 10_000
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Seconds one file may take to decode before its decoder is taken to hang (its process is
    # killed; see pipeline.crash_guard). A 100 MP JPEG 2000, the slowest legitimate case at
    # the default max_pixels, is tens of seconds on one core (OpenJPEG decodes a few MP/s).
    decode_timeout: float = 300.0
    # Seconds a device call may give no result before it is taken to hang (its actor is
    # killed; see pipeline.crash_guard.HangWatch). None: from the model's own first call
    # (pipeline.infer.INFER_TIMEOUT_FLOOR and _SLACK say how).
    infer_timeout: float | None = None
    input_format: str = "images"  # one of INPUT_FORMATS
    input_list: bool = False  # input is a file listing the inputs (.txt, .csv, .parquet)
    image_column: str = "image"  # parquet: the encoded-image column
    id_column: str = "id"  # parquet: the unique id column; row path = <file>/<id>
    progress: bool | None = None  # False: no status line (batch-infer run, the Ray Job)

    def resolved(self) -> RunConfig:
        """This config with its local paths absolute (``~`` expanded). Ray's workers resolve a
        relative path against their own directory, which is the driver's only in a Ray the
        driver started: joining a ``ray start`` head, 'out/_listing.arrow' was looked for
        in '/'."""
        model = self.model  # a factory may take a name: only a path found here is a path
        if model and os.path.exists(os.path.expanduser(model)):
            model = absolute_path(model)
        return dataclasses.replace(self, input=absolute_path(self.input),
                                   output=absolute_path(self.output), model=model)

    @property
    def actor_platform(self) -> str:
        """The JAX platform the actors compute on."""
        return self.platform or ("gpu" if self.gpus_per_actor > 0 else "cpu")

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            problems.append(f"actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor < 0:
            problems.append(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.platform is not None and self.platform not in PLATFORMS:
            problems.append(
                f"platform must be one of {', '.join(PLATFORMS)}, got {self.platform!r}")
        if self.device_batch_size is not None and (
            self.device_batch_size < 1 or self.device_batch_size % max(self.batch_size, 1)
        ):
            problems.append(
                f"device_batch_size must be a positive multiple of batch_size ({self.batch_size}), "
                f"got {self.device_batch_size}"
            )
        if self.top_k < 1:
            problems.append(f"top_k must be at least 1, got {self.top_k}")
        if self.rows_per_file < 1:
            problems.append(f"rows_per_file must be at least 1, got {self.rows_per_file}")
        if self.max_pixels < 1:  # else every image would be an error row
            problems.append(f"max_pixels must be at least 1, got {self.max_pixels}")
        if not self.decode_timeout > 0:  # NaN too
            problems.append(f"decode_timeout must be a positive number of seconds, got "
                            f"{self.decode_timeout}")
        if self.infer_timeout is not None and not self.infer_timeout > 0:
            problems.append(f"infer_timeout must be a positive number of seconds, got "
                            f"{self.infer_timeout}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            problems.append(
                f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.input_format not in INPUT_FORMATS:
            problems.append(
                f"input_format must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}"
            )
        if self.overwrite and self.resume:
            problems.append("overwrite and resume cannot both be set")
        if problems:
            raise ConfigError("; ".join(problems) + ".")
