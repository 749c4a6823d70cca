"""Concurrent object reads: images/s of one decode task's work, serial vs concurrent reads.

One decode task's work is ``fetch_all`` feeding ``decode_payloads``, as ``Source.decode``
runs it, on photo-like JPEGs (480x360, ~30 KB) decoded to 160x160 RGB. The objects live in
moto's S3 server behind :mod:`pipeline.testing.s3_proxy`, which delays every request by
``--latency-ms`` (both run in a child process, so their threads take none of this process's
GIL). Each variant (threads, listing sizes given or not) runs ``--repeats`` times,
interleaved, in a rotating order; we report the median images/s, the ratio to the serial
read, and the requests per object the proxy counted; also the rate of decoding the same
bytes from memory (the most any read can reach). ``--local`` runs the same on a local
directory instead: from the page cache, or with ``--cold`` from the disk (each file's cached
pages dropped before each run with ``posix_fadvise(DONTNEED)``, which touches no other file).

    python -m pipeline.bench_fetch --latency-ms 30 --images 400
    python -m pipeline.bench_fetch --latency-ms 30 --threads 1 8 16 32 64
    python -m pipeline.bench_fetch --local --cold --images 1000 --threads 1 4 8 32

What to expect (2026-11-26, a shared 2-core machine, 200 images, medians of 3-5): at 30 ms
per request, 12.6 images/s with 1 thread and 88 with 24 (7.0x); at 10 ms 28 -> 96 (3.5x); at
50 ms 8.1 -> 97 (12x). Beyond ~8 threads moto is the limit (it serves ~120-135 images/s here
with no delay added), not the reads; 4 threads give exactly 4x. Every object costs one HEAD
and one GET, listing sizes or not (pyarrow 26, see ``pipeline.read._open_object``). Local
files: from the page cache threads change nothing measurable; from the disk (``--cold``)
1 thread 331 images/s, 8 threads 390, decoding from memory 482.

The machines this runs on are shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import numpy as np

BUCKET = "bench-fetch"


def photo_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """480x360 JPEGs at quality 85 that compress like photos (~30 KB): smooth gradients,
    a few shapes, mild noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:360, 0:480].astype(np.float32)
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(-1, 1, 3)
        base = 128 + 60 * np.sin(a * x / 60 + b * y / 45 + c)  # (360, 480)
        rgb = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 6, (360, 480, 3))
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse((x0, y0, x0 + rng.integers(20, 80), y0 + rng.integers(20, 60)), fill)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def one_task(paths: list[str], sizes, threads: int, spec) -> float:
    """Seconds for one decode task's worth: every path read and decoded, as Source.decode."""
    from pipeline.decode import decode_payloads
    from pipeline.read import fetch_all

    start = time.perf_counter()
    payloads = (p for _, p in fetch_all(paths, sizes, threads))
    out = decode_payloads(paths, payloads, spec)
    seconds = time.perf_counter() - start
    errors = [e for e in out["error"] if e]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed, e.g. {errors[0]}")
    return seconds


@contextlib.contextmanager
def slow_s3(latency_ms: float) -> Iterator[dict]:
    """moto + the delaying proxy in a child process; yields their URLs."""
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.testing.s3_proxy", "--latency-ms", str(latency_ms)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        yield json.loads(child.stdout.readline())
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()


def proxy_stats(proxy: str, reset: bool = False) -> dict:
    request = urllib.request.Request(
        f"{proxy}/__proxy__/{'reset' if reset else 'stats'}", method="POST" if reset else "GET")
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def s3_filesystem(url: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=url.split("://", 1)[1], scheme="http",
                             region="us-east-1", access_key="bench", secret_key="bench",
                             allow_bucket_creation=True)


def upload(url: str, images: list[bytes]) -> tuple[list[str], list[int]]:
    fs = s3_filesystem(url)
    fs.create_dir(BUCKET)
    for i, data in enumerate(images):
        with fs.open_output_stream(f"{BUCKET}/in/{i:06d}.jpg") as f:
            f.write(data)
    from pyarrow.fs import FileSelector

    infos = sorted(fs.get_file_info(FileSelector(f"{BUCKET}/in")), key=lambda i: i.path)
    return [f"s3://{i.path}" for i in infos], [i.size for i in infos]


def use_endpoint(url: str) -> None:
    """Point this process's S3 filesystem (pipeline.read._s3) at ``url``."""
    from pipeline import read

    os.environ.update(AWS_ENDPOINT_URL=url, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench")
    read._s3.cache_clear()


def measure(variants: list[tuple[int, bool]], paths, sizes, images, spec, repeats: int,
            proxy: str | None = None, cold: bool = False) -> dict:
    """images/s per (threads, sizes given) over repeats, interleaved in rotating order; key
    (0, False) is decoding ``images`` from memory."""
    from pipeline.decode import decode_payloads

    variants = [(0, False), *variants]
    rates: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    requests: dict[tuple[int, bool], dict] = {}
    one_task(paths[:8], None, 1, spec)  # warm: filesystem, Pillow, connections
    for r in range(repeats):
        for threads, with_sizes in variants[r % len(variants):] + variants[: r % len(variants)]:
            if proxy:
                proxy_stats(proxy, reset=True)
            if cold:
                drop_cached(paths)
            if threads == 0:
                start = time.perf_counter()
                decode_payloads(paths, images, spec)
                seconds = time.perf_counter() - start
            else:
                seconds = one_task(paths, sizes if with_sizes else None, threads, spec)
            rates[(threads, with_sizes)].append(len(paths) / seconds)
            if proxy and threads:
                requests[(threads, with_sizes)] = proxy_stats(proxy)
    out = {}
    for v in variants:
        row = {"images_per_s": statistics.median(rates[v]),
               "spread": [min(rates[v]), max(rates[v])]}
        if v in requests:
            counts = requests[v]["counts"]
            row["head_per_object"] = counts.get("HEAD", 0) / len(paths)
            row["get_per_object"] = counts.get("GET", 0) / len(paths)
            row["max_in_flight"] = requests[v]["max_in_flight"]
        out[v] = row
    return out


def drop_cached(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def report(title: str, results: dict, images: int) -> None:
    base = results[min(v for v in results if v[0])]["images_per_s"]  # the serial read
    print(f"\n{title}, {images} images")
    print(f"{'threads':>7} {'sizes':>5} {'images/s':>9} {'(min-max)':>15} {'x serial':>8}"
          f" {'HEAD/obj':>8} {'GET/obj':>7} {'in flight':>9}")
    for (threads, with_sizes), row in sorted(results.items()):
        lo, hi = row["spread"]
        extra = ""
        if "head_per_object" in row:
            extra = (f" {row['head_per_object']:8.2f} {row['get_per_object']:7.2f}"
                     f" {row['max_in_flight']:9d}")
        name = f"{threads:7d} {'yes' if with_sizes else 'no':>5}" if threads else "(decode only) "
        print(f"{name} {row['images_per_s']:9.1f}"
              f" {f'({lo:.0f}-{hi:.0f})':>15} {row['images_per_s'] / base:8.2f}{extra}")


def main(argv: list[str] | None = None) -> None:
    from pipeline.model import ModelSpec
    from pipeline.read import DEFAULT_FETCH_THREADS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, DEFAULT_FETCH_THREADS])
    parser.add_argument("--sizes", choices=("no", "yes", "both"), default="no",
                        help="pass the listing's sizes to fetch_all")
    parser.add_argument("--local", action="store_true", help="a local directory, no proxy")
    parser.add_argument("--cold", action="store_true", help="--local: read from the disk")
    args = parser.parse_args(argv)

    spec = ModelSpec(height=160, width=160, channels=3, class_names=("a", "b"))
    images = photo_like_jpegs(args.images)
    print(f"{len(images)} JPEGs 480x360, mean {np.mean([len(i) for i in images]) / 1e3:.1f} KB"
          f" -> 160x160 RGB; median of {args.repeats}, interleaved")
    with_sizes = {"no": [False], "yes": [True], "both": [False, True]}[args.sizes]
    variants = [(t, s) for t in sorted(set(args.threads)) for s in with_sizes]
    if args.local:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, data in enumerate(images):
                paths.append(os.path.join(tmp, f"{i:06d}.jpg"))
                with open(paths[-1], "wb") as f:
                    f.write(data)
            sizes = [len(i) for i in images]
            results = measure(variants, paths, sizes, images, spec, args.repeats, cold=args.cold)
        report(f"local files ({'disk' if args.cold else 'page cache'})", results, len(images))
        return
    with slow_s3(args.latency_ms) as urls:
        paths, sizes = upload(urls["upstream"], images)
        use_endpoint(urls["proxy"])
        results = measure(variants, paths, sizes, images, spec, args.repeats, urls["proxy"])
    report(f"S3 (moto) behind a proxy adding {args.latency_ms:g} ms per request", results,
           len(images))


if __name__ == "__main__":
    main()
