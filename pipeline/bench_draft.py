"""``python -m pipeline.bench_draft``: how far JPEG draft decoding moves the model's input, and
what it saves. The numbers behind :data:`pipeline.resize.DRAFT_TOLERANCE`.

*Error*: photo-like JPEGs (:mod:`pipeline.photos`) of many sizes, aspect ratios and qualities,
decoded for every resize mode, interpolation and L/RGB target, with draft and with a full
decode; per interpolation, |draft - full| in uint8 levels over every pixel of every case where
draft did shrink the decode (mean, 99.9th percentile, max), and the worst single image (cases
where it only took the luma plane for an L target are counted apart). *Speed*: median CPU ms
per decode with and without draft, repeats interleaved. The machines are shared: read ratios.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from pipeline import resize
from pipeline.decode import decode_image
from pipeline.photos import photo
from pipeline.spec import INTERPOLATIONS, RESIZE_MODES, ModelSpec

SOURCES = ((480, 360), (360, 480), (640, 480), (1024, 768), (1280, 720), (333, 222),
           (2000, 1500), (1000, 1000), (1600, 400), (301, 1203), (719, 541))
QUALITIES = (50, 75, 90, 95)
TARGETS = ((224, 224), (160, 160), (32, 32), (96, 64), (384, 384))
SPEED_CASES = (((480, 360), 160), ((1024, 768), 224), ((2000, 1500), 224))


def spec_for(target: tuple[int, int], channels: int, mode: str, interpolation: str) -> ModelSpec:
    return ModelSpec(height=target[1], width=target[0], channels=channels, class_names=("x",),
                     resize=mode, interpolation=interpolation)


def jpeg(width: int, height: int, quality: int, seed: int) -> bytes:
    buf = io.BytesIO()
    photo(np.random.default_rng(seed), width, height).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def drafted_scale(data: bytes, spec: ModelSpec) -> int:
    """The 1/scale libjpeg decodes at for ``spec`` (1: no size reduction)."""
    img = Image.open(io.BytesIO(data))
    plan = resize.layout(img.size, spec)
    request = resize.draft_request(plan, spec, 1)
    before = img.size[0]
    img.draft("RGB", request)
    return round(before / img.size[0]) if img.size[0] else 1


def error_table(sources=SOURCES, qualities=QUALITIES, targets=TARGETS) -> dict:
    """interpolation -> {"shrunk": stats, "luma_only": stats} of |draft - full| in levels."""
    diffs: dict[str, dict[str, list[np.ndarray]]] = {
        name: {"shrunk": [], "luma_only": []} for name in INTERPOLATIONS}
    for i, (size, quality) in enumerate((s, q) for s in sources for q in qualities):
        data = jpeg(*size, quality, seed=i)
        for target in targets:
            for mode in RESIZE_MODES:
                for interpolation in INTERPOLATIONS:
                    for channels in (1, 3):
                        spec = spec_for(target, channels, mode, interpolation)
                        _compare(data, spec, diffs[interpolation])
    return {name: {kind: stats(arrays) for kind, arrays in kinds.items()}
            for name, kinds in diffs.items()}


def digits_table(count: int = 300, seed: int = 0) -> dict:
    """The same for the bundled model's inputs: held-out digits rendered at 48..400 px (sharp
    dark-on-light graphics, unlike photos), JPEG quality 40..95, to its 32x32 gray squash."""
    from pipeline import digits

    _, (x, _) = digits.load_split()
    rng = np.random.default_rng(seed)
    diffs: dict[str, dict[str, list[np.ndarray]]] = {
        name: {"shrunk": [], "luma_only": []} for name in INTERPOLATIONS}
    for i in range(count):
        img = digits.render(x[i % len(x)], int(rng.integers(48, 401)),
                            ("nearest", "bilinear")[i % 2], rgb=i % 3 == 0)
        data = digits.encode(img, "JPEG", quality=int(rng.integers(40, 96)))
        for interpolation in INTERPOLATIONS:
            _compare(data, spec_for((32, 32), 1, "squash", interpolation), diffs[interpolation])
    return {name: {kind: stats(arrays) for kind, arrays in kinds.items()}
            for name, kinds in diffs.items()}


def _compare(data: bytes, spec: ModelSpec, into: dict[str, list[np.ndarray]]) -> None:
    fast = decode_image(data, spec).astype(np.int16)
    full = decode_image(data, spec, draft=False).astype(np.int16)
    kind = "shrunk" if drafted_scale(data, spec) > 1 else "luma_only"
    if kind == "shrunk" or spec.channels == 1:
        into[kind].append(np.abs(fast - full).ravel())


def stats(arrays: list[np.ndarray]) -> dict:
    """Pooled over every pixel of every case, and the worst single case."""
    if not arrays:
        return {"cases": 0}
    d = np.concatenate(arrays)
    return {"cases": len(arrays), "mean": float(d.mean()), "p99.9": float(np.percentile(d, 99.9)),
            "max": int(d.max()), "worst_mean": max(float(a.mean()) for a in arrays),
            "worst_p99.9": max(float(np.percentile(a, 99.9)) for a in arrays)}


def speed_table(repeats: int = 9, images: int = 20, interpolation: str = "bilinear") -> list:
    """Median CPU ms per decode (RGB), draft vs full, for SPEED_CASES in every resize mode."""
    rows = []
    for size, side in SPEED_CASES:
        files = [jpeg(*size, 85, seed=1000 + i) for i in range(images)]
        for mode in RESIZE_MODES:
            spec = spec_for((side, side), 3, mode, interpolation)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeats):
                for draft in (True, False):  # interleaved: load changes hit both alike
                    # CPU time of this process: other processes on a shared machine
                    # inflate wall time far more than they slow our CPU.
                    start = time.process_time()
                    for data in files:
                        decode_image(data, spec, draft=draft)
                    times[draft].append((time.process_time() - start) / images * 1e3)
            fast, full = statistics.median(times[True]), statistics.median(times[False])
            rows.append({"source": size, "target": side, "mode": mode, "draft_ms": fast,
                         "full_ms": full, "speedup": full / fast,
                         "scale": drafted_scale(files[0], spec)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer sources and targets")
    args = parser.parse_args(argv)
    kwargs = {"sources": SOURCES[:4], "qualities": (75, 95)} if args.quick else {}
    print(f"draft margins {resize.DRAFT_MARGINS}; |draft - full decode| in uint8 levels")
    for corpus, table in (("photos", error_table(**kwargs)),
                          ("digits", digits_table(100 if args.quick else 300))):
        for name, kinds in table.items():
            for kind, s in kinds.items():
                if s["cases"]:
                    print(f"  {corpus} {name:9s} {kind:9s} cases {s['cases']:4d}  mean "
                          f"{s['mean']:.3f}  p99.9 {s['p99.9']:4.1f}  max {s['max']:3d}  "
                          f"worst image: mean {s['worst_mean']:.3f}, "
                          f"p99.9 {s['worst_p99.9']:4.1f}")
    for row in speed_table(args.repeats):
        w, h = row["source"]
        print(f"  {w}x{h} -> {row['target']} {row['mode']:11s} bilinear: draft 1/{row['scale']} "
              f"{row['draft_ms']:.2f} ms, full {row['full_ms']:.2f} ms, "
              f"speedup {row['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
