"""What every contestant runs on: the model, the images, the device, in one :class:`Setup`.

The setup travels as JSON to each contestant's own process (``python -m pipeline.bench
--contestant``) and to the children that hold a GPU (:mod:`pipeline.bench.gpu`), so that all
of them run the same model on the same images with the same device batch.

Two workloads: ``digits`` (128x96 JPEGs of the sklearn digits, a few hundred bytes each:
decode costs almost nothing) and ``photos`` (:func:`pipeline.photos.write_photos`, 480x360
JPEGs at quality 85, ~30 KB: decode costs what it costs on web photos of that size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORKLOADS = ("digits", "photos")
DEFAULT_SIZES = {"digits": (128, 96), "photos": (480, 360)}
UNIT = 32  # rows per model call: the pipeline's --batch-size default


@dataclass(frozen=True)
class Setup:
    """The model, the images and the devices of one bench run."""

    model_fn: str | None = None  # None: the bundled digits CNN
    model: str | None = None  # checkpoint for the factory
    workload: str = "digits"
    image_size: tuple[int, int] | None = None  # (width, height); None: the workload's default
    gpus: int = 0  # GPUs on this machine: each Ray contestant's actors ask for one each
    # What JAX computes on: "gpu" where there are GPUs; "cpu" with gpus > 0 asks Ray for GPUs
    # but computes on the CPU (to test the GPU paths on a machine without one).
    platform: str = "cpu"
    batch_size: int = UNIT
    device_batch: int = UNIT  # rows per device call, for every contestant (the plan's choice)

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(
                f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.image_size is None:
            object.__setattr__(self, "image_size", DEFAULT_SIZES[self.workload])
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if self.device_batch % self.batch_size:
            raise ValueError(f"device batch {self.device_batch} is not a multiple of "
                             f"{self.batch_size}")

    @property
    def on_gpu(self) -> bool:
        """Does JAX compute on a GPU? Then only child processes may start it (see gpu.py)."""
        return self.platform != "cpu"

    def load_model(self):
        from pipeline.model import load_model

        return load_model(self.model, self.model_fn)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Setup:
        return cls(**json.loads(text))


def make_images(setup: Setup, work: Path, count: int) -> Path:
    """A directory under ``work`` holding ``count`` JPEGs of the setup's workload and size
    (reused when a finished one is there)."""
    width, height = setup.image_size
    directory = work / f"images_{setup.workload}_{count}_{width}x{height}"
    marker = directory / "_complete"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    if setup.workload == "photos":
        _write_photos(directory, count, (width, height))
    else:
        _write_digits(directory, count, width, height)
    marker.write_text("")
    return directory


def _write_photos(directory: Path, count: int, size: tuple[int, int]) -> None:
    """:func:`pipeline.photos.write_photos` in slices over this machine's cores: about 6 ms
    an image on one core, so a GPU node's 30,000-photo run is not three minutes of set-up."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.photos import write_photos

    per = 500
    slices = [(start, min(per, count - start)) for start in range(0, count, per)]
    if len(slices) == 1 or cores() == 1:
        write_photos(directory, count, size)
        return
    # Spawned, not forked: the caller may hold JAX's or Ray's threads.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(cores(), len(slices)), mp_context=spawn) as pool:
        for done in [pool.submit(write_photos, directory, n, size, start=start)
                     for start, n in slices]:
            done.result()


def _write_digits(directory: Path, count: int, width: int, height: int) -> None:
    """Digit JPEGs named ``NNNNNNN_<true label>.jpg``, 1,000 per subdirectory."""
    from pipeline import digits

    _, (x, y) = digits.load_split()
    for i in range(count):
        img = digits.render(x[i % len(x)], height).resize((width, height))
        sub = directory / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:07d}_{y[i % len(y)]}.jpg").write_bytes(digits.encode(img, "JPEG", 90))


def image_paths(directory: Path) -> list[str]:
    from pipeline.walk import list_images

    return list_images(str(directory)).paths


def decode_sample(paths: list[str], spec, repeats: int = 3) -> tuple[np.ndarray, float]:
    """Decode ``paths`` (read + :func:`pipeline.decode.decode_image`, as the pipeline's decode
    tasks do) ``repeats`` times in this one process; returns the images (N, H, W, C) uint8 and
    the median over repeats of the mean ms per image: one core's decode cost."""
    from pipeline.decode import decode_image

    images = np.zeros((len(paths), *spec.shape), np.uint8)  # (N, H, W, C)
    per_image = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for i, path in enumerate(paths):
            images[i] = decode_image(Path(path).read_bytes(), spec)
        per_image.append(1000 * (time.perf_counter() - start) / max(len(paths), 1))
    return images, float(np.median(per_image))


def tiled(images: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows cycling through ``images`` (the first len(images) rows are ``images``)."""
    return images[np.arange(count) % len(images)]  # (count, H, W, C)


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_for(setup: Setup, model, images: int) -> Any:
    """The pipeline's resource plan for this machine (one node: its cores and ``setup.gpus``),
    decided as ``pipeline.run`` would; lowering for the actors' platform starts no GPU."""
    from pipeline.config import RunConfig
    from pipeline.model import check_model
    from pipeline.plan import Cluster, Node, make_plan

    gpus = setup.gpus
    cfg = RunConfig(input="-", output="-", model=setup.model, model_fn=setup.model_fn,
                    batch_size=setup.batch_size, gpus_per_actor=1.0 if gpus else 0.0,
                    platform=setup.platform if gpus else None)
    flops = check_model(model, setup.batch_size, cfg.actor_platform)
    node = Node("bench", "127.0.0.1", float(cores()), float(gpus), 0.0, head=True)
    return make_plan(cfg, Cluster((node,)), units=images,
                     image_bytes=int(np.prod(model.spec.shape)), flops_per_image=flops)
