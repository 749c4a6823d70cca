"""``python -m pipeline.bench_decode``: decode images/s per core, the number that sizes a
cluster's CPUs per GPU (``cluster.yaml``, ``k8s/rayjob.yaml``).

One process, pinned to one core, decodes photo-like JPEGs (:mod:`pipeline.photos`, quality 85)
of the sizes users feed us to ResNet-50's input (224x224 RGB, center_crop 0.875, bilinear: the
spec of :mod:`pipeline.models.resnet`), and 480x360 to the 160x160 squash that ``bench_fetch``
and the realistic-workload measurements use, through :func:`pipeline.decode.decode_image` as
the decode stage calls it (JPEG draft on). Each case decodes ``--images`` distinct images
``--repeats`` times; we report the median per image of CPU time (``time.process_time``) and of
wall time. Images/s per core is 1 / CPU seconds per image: on a shared machine the wall time
also counts the moments other processes held the core.

    python -m pipeline.bench_decode                  # ~20 s
    python -m pipeline.bench_decode --json decode.json

What to expect (2026-11-26, the shared 2-vCPU AMD EPYC dev machine under KVM, Pillow 13, 12
images, median of 5; the range of four runs), images/s per core: 500x375 -> 224 crop 280-340
(~3.1 ms), 1024x768 153-160 (~6.3 ms), 2000x1500 99-105 (drafted 1/2, ~9.7 ms), 4032x3024
40-44 (drafted 1/4, ~23 ms); 480x360 -> 160 squash 615-685 (~1.6 ms). A Ray CPU is a vCPU:
where vCPUs are hyperthreads, all of them busy give less each than one alone does here, which
the cluster configs' sizing allows for.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.bench_draft import drafted_scale
from pipeline.decode import decode_image
from pipeline.photos import photo
from pipeline.spec import ModelSpec

RESNET50 = ModelSpec(height=224, width=224, channels=3, class_names=("x",),
                     resize="center_crop", crop_fraction=0.875, interpolation="bilinear")
SQUASH160 = ModelSpec(height=160, width=160, channels=3, class_names=("x",))
# (label, source width x height, target spec name)
CASES = (
    ("ImageNet-like", (500, 375), "resnet50"),
    ("web 0.8 MP", (1024, 768), "resnet50"),
    ("camera 3 MP", (2000, 1500), "resnet50"),
    ("phone 12 MP", (4032, 3024), "resnet50"),
    ("bench 480x360", (480, 360), "squash160"),
)
SPECS = {"resnet50": RESNET50, "squash160": SQUASH160}


@dataclass(frozen=True)
class Row:
    case: str
    source: tuple[int, int]
    target: str
    jpeg_kb: float  # median file size
    draft_scale: int  # libjpeg decodes at 1/draft_scale
    cpu_ms: float  # median CPU ms per image
    wall_ms: float
    images_per_s_per_core: float  # 1000 / cpu_ms


def jpegs(size: tuple[int, int], count: int, seed: int = 0) -> list[bytes]:
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photo(np.random.default_rng((seed, *size, i)), *size).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def measure(label: str, size: tuple[int, int], target: str, images: int, repeats: int) -> Row:
    spec = SPECS[target]
    files = jpegs(size, images)
    decode_image(files[0], spec)  # warm: first-call imports and plugin lookups
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for data in files:
            decode_image(data, spec)
        cpu.append((time.process_time() - c0) / len(files) * 1e3)
        wall.append((time.perf_counter() - w0) / len(files) * 1e3)
    cpu_ms = statistics.median(cpu)
    return Row(label, size, target, statistics.median(len(f) for f in files) / 1e3,
               drafted_scale(files[0], spec), cpu_ms, statistics.median(wall), 1e3 / cpu_ms)


def pin_to_one_core() -> int:
    """Run on one core from here on (the lowest this process may use); returns its number."""
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="distinct images per case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    core = pin_to_one_core()
    print(f"decode_image, JPEG q85 photo-like, one process on core {core}; "
          f"{args.images} images x {args.repeats} repeats, medians")
    print(f"{'case':14s} {'source':>10s} {'target':>10s} {'KB':>6s} {'draft':>6s} "
          f"{'CPU ms':>7s} {'wall ms':>8s} {'img/s/core':>11s}")
    rows = []
    for label, size, target in CASES:
        row = measure(label, size, target, args.images, args.repeats)
        rows.append(row)
        print(f"{label:14s} {f'{size[0]}x{size[1]}':>10s} {target:>10s} {row.jpeg_kb:6.0f} "
              f"{f'1/{row.draft_scale}':>6s} {row.cpu_ms:7.2f} {row.wall_ms:8.2f} "
              f"{row.images_per_s_per_core:11.0f}")
    result = {"core": core, "images": args.images, "repeats": args.repeats,
              "rows": [asdict(r) for r in rows]}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
