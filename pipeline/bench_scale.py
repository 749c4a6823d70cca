"""Scale benchmarks: what the driver pays as inputs and output rows grow.

* **writer** — an embedding model that is nearly free (1024 floats per row from a tiny
  image) through ``pipeline.run``, so writing the rows is most of the work: rows/s, and the
  driver process's own CPU seconds per 1,000 rows (``getrusage``: Ray's workers excluded).
* **driver memory** — ``pipeline.run`` on N inputs (hard links to one small PNG, so a million
  inputs cost no disk), and the driver process's peak RSS, alone (not Ray's workers).

Each measurement runs in its own process (``python -m pipeline.bench_scale``), so one peak
does not hide another. Times on a shared machine are noisy: compare within one run.

    python -m pipeline.bench_scale writer --rows 50000 --work /tmp/scale
    python -m pipeline.bench_scale memory --inputs 100000 1000000 --work /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 1024
SIDE = 8  # the embedder's input: 8x8 gray


def build_embedder(path: str | None = None):
    """Model factory: 8x8 gray -> 1024 floats, one small matmul (the writer dominates)."""
    import pipeline

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((SIDE * SIDE, EMBEDDING_DIM)).astype(np.float32)}

    def apply(params, x):  # (B, 8, 8, 1) float32
        return x.reshape(x.shape[0], -1) @ params["w"]  # (B, 1024)

    spec = pipeline.ModelSpec(height=SIDE, width=SIDE, channels=1, output="embedding",
                              embedding_dim=EMBEDDING_DIM)
    return pipeline.Model(apply=apply, params=params, spec=spec, name="bench_embedder")


def make_inputs(directory: Path, count: int) -> Path:
    """``count`` hard links to one 8x8 PNG, 1,000 per subdirectory (reused if present)."""
    from PIL import Image

    marker = directory / f"_inputs_{count}"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    pixels = Image.fromarray(np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE))
    for i in range(count):
        if i % 50_000 == 0:  # a file takes at most 65,000 links on ext4: a new one each 50,000
            source = directory / f"source-{i // 50_000}.png.orig"
            pixels.save(source, format="PNG")
        sub = directory / f"{i // 1000:05d}"
        if i % 1000 == 0:
            sub.mkdir(exist_ok=True)
        target = sub / f"{i:08d}.png"
        if not target.exists():
            os.link(source, target)
    marker.write_text("")
    return directory


def measure(kind: str, inputs: str, output: str) -> dict:
    """One run in this process: rows, seconds, the driver's CPU seconds and peak RSS."""
    import ray

    import pipeline

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
    options = {"model_fn": "pipeline.bench_scale:build_embedder"} if kind == "writer" else {}
    before = resource.getrusage(resource.RUSAGE_SELF)
    rss_before = before.ru_maxrss
    start, main_start = time.perf_counter(), time.thread_time()
    summary = pipeline.run(inputs, output, overwrite=True, progress=False, **options)
    seconds, main_cpu = time.perf_counter() - start, time.thread_time() - main_start
    after = resource.getrusage(resource.RUSAGE_SELF)
    ray.shutdown()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = summary.rows_ok + summary.rows_error
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds,
            "driver_cpu_seconds": cpu, "driver_cpu_ms_per_1000_rows": 1e6 * cpu / max(rows, 1),
            # The driver's own thread: the pipeline's work there (Ray Data's executor runs
            # in threads of its own, and costs about a tenth of a core whatever the rows).
            "main_thread_cpu_ms_per_1000_rows": 1e6 * main_cpu / max(rows, 1),
            "driver_peak_rss_mb": after.ru_maxrss / 1024,
            "driver_rss_at_start_mb": rss_before / 1024}


def run_measure(kind: str, inputs: Path, work: Path) -> dict:
    out = work / f"out_{kind}"
    cmd = [sys.executable, "-m", "pipeline.bench_scale", "--measure", kind, str(inputs), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--measure":  # one measurement, in its own process
        print(json.dumps(measure(argv[1], argv[2], argv[3])))
        return 0
    p = argparse.ArgumentParser(prog="python -m pipeline.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("writer", "memory"))
    p.add_argument("--rows", type=int, default=50_000, help="writer: rows (default: 50000)")
    p.add_argument("--inputs", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="memory: input counts (default: 100000 1000000)")
    p.add_argument("--repeats", type=int, default=3, help="writer: runs (default: 3)")
    p.add_argument("--work", default="/tmp/batch-infer-scale", help="inputs and outputs")
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.what == "writer":
        inputs = make_inputs(work / f"inputs_{args.rows}", args.rows)
        runs = [run_measure("writer", inputs, work) for _ in range(args.repeats)]
        keys = ("rows_per_second", "driver_cpu_ms_per_1000_rows",
                "main_thread_cpu_ms_per_1000_rows", "driver_peak_rss_mb")
        result = {"rows": args.rows, "embedding_dim": EMBEDDING_DIM, "runs": runs,
                  "median": {k: float(np.median([r[k] for r in runs])) for k in keys}}
    else:
        result = {"runs": {n: run_measure("memory", make_inputs(work / f"inputs_{n}", n), work)
                           for n in args.inputs}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
