"""``batch-infer bench``: the seed's before/after table and end-to-end ratios, in one run.

All on the bundled digits CNN:

* **seed table** — "before": each image on its own, host->device transfer, then the layers as
  separate un-jitted ops (Conv, BiasAdd, ReLU, Conv, BiasAdd, ReLU, Dense), device->host
  transfer, every stage timed after ``block_until_ready``; "after": batches of 32, one transfer
  in, the AOT-compiled fused program, one transfer out.
* **model stage** — the compiled model called in-process vs the pipeline's ``Predictor`` in a
  Ray actor, on the same decoded images (and the labels must agree).
* **end to end** — the same JPEG files through (a) a plain single-process loop (Pillow decode
  + the compiled batch-of-32 model), (b) Ray Data's documented recipe (``read_images`` ->
  ``map_batches(callable class)`` -> ``write_parquet``) and (c) ``pipeline.run``. Each runs in
  its own process, repeated and interleaved; we report medians, ratios, and the peak resident
  memory of each contestant's whole process tree (Ray workers included). Ray start-up
  (``ray.init``, then Ray Data's per-cluster actors) is timed apart and left out of images/s
  for both Ray contestants; the report also gives the ratio with the second part counted.
* **memory** (optional) — the pipeline's peak memory on N times the images.

The machines this runs on are shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BEFORE_STAGES = ("transfer_in", "normalise", "conv1", "bias1", "relu1", "conv2", "bias2", "relu2", "dense", "transfer_out")
AFTER_STAGES = ("transfer_in", "compute", "transfer_out")
CONTESTANTS = ("loop", "ray_recipe", "pipeline")


# ---------------------------------------------------------------- seed table


def seed_table(images: np.ndarray, repeats: int = 3, batch_size: int = 32) -> dict:
    """Per-stage ms for the op-by-op per-image path and the batched compiled path."""
    import jax

    from pipeline.model import load_model

    model = load_model()
    executor = model.executor(batch_size)
    params = jax.device_put(model.params)
    _before_one(images[0], params, model.spec)  # warm the op-by-op kernels
    executor.run_serial(images[:batch_size])
    before, after = [], []
    for _ in range(repeats):
        totals = dict.fromkeys(BEFORE_STAGES, 0.0)
        for img in images:
            for stage, seconds in _before_one(img, params, model.spec)[0].items():
                totals[stage] += seconds
        before.append({k: 1000 * v / len(images) for k, v in totals.items()})
        _, seconds = executor.run_serial(images)  # each stage waited for, as the seed times it
        after.append({k: 1000 * v / len(images) for k, v in seconds.items()})
    before_ms = {k: statistics.median(r[k] for r in before) for k in BEFORE_STAGES}
    after_ms = {k: statistics.median(r[k] for r in after) for k in AFTER_STAGES}
    b, a = sum(before_ms.values()), sum(after_ms.values())
    return {
        "device": executor.describe(),
        "images": len(images),
        "batch_size": batch_size,
        "before_ms_per_image": before_ms,
        "after_ms_per_image": after_ms,
        "before_total_ms_per_image": b,
        "after_total_ms_per_image": a,
        "speedup": b / a if a else float("nan"),
    }


def _normalise(x, spec):
    """The bundled model's input step, op by op: scale to [0, 1], then its contrast stretch."""
    import jax.numpy as jnp

    x = x.astype(jnp.float32) * spec.scale + spec.offset
    lo, hi = x.min(), x.max()
    return (x - lo) / jnp.maximum(hi - lo, 0.1)


def _before_one(img: np.ndarray, params, spec) -> tuple[dict[str, float], np.ndarray]:
    """One image, one op at a time, each timed to completion: the seed's "before" column.
    Returns the stage timings and the (1, D) probabilities."""
    import jax
    from jax import lax

    t = {}
    dims = ("NHWC", "HWIO", "NHWC")

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        out = out.block_until_ready() if hasattr(out, "block_until_ready") else out
        t[name] = time.perf_counter() - start
        return out

    x = timed("transfer_in", lambda: jax.device_put(img[None]))  # (1, H, W, C) uint8
    x = timed("normalise", lambda: _normalise(x, spec))
    for i, layer in ((1, "conv1"), (2, "conv2")):
        x = timed(f"conv{i}", lambda: lax.conv_general_dilated(x, params[f"{layer}/w"], (2, 2), "SAME",
                                                               dimension_numbers=dims))
        x = timed(f"bias{i}", lambda: x + params[f"{layer}/b"])
        x = timed(f"relu{i}", lambda: jax.nn.relu(x))
    x = timed("dense", lambda: jax.nn.softmax(x.reshape(1, -1) @ params["dense/w"] + params["dense/b"]))
    probs = timed("transfer_out", lambda: np.asarray(x))
    return t, probs


# ---------------------------------------------------------------- end to end


def make_images(directory: Path, count: int, width: int = 128, height: int = 96) -> Path:
    """``count`` JPEG digit images of ``width`` x ``height`` (reused if already there)."""
    from pipeline import digits

    marker = directory / f"_bench_{count}_{width}x{height}"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    _, (x, y) = digits.load_split()
    for i in range(count):
        img = digits.render(x[i % len(x)], height).resize((width, height))
        sub = directory / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:07d}_{y[i % len(y)]}.jpg").write_bytes(digits.encode(img, "JPEG", 90))
    marker.write_text("")
    return directory


def contestant(name: str, images: str, output: str) -> dict:
    """Run one contestant in this process; returns its timings."""
    if name == "loop":
        return _loop(images, output)
    import ray

    init, data_start = start_ray()
    start = time.perf_counter()
    if name == "ray_recipe":
        rows = _ray_recipe(images, output)
        result = {"images": rows}
    else:
        import pipeline

        summary = pipeline.run(images, output, overwrite=True, progress=False)
        result = {"images": summary.rows_ok + summary.rows_error,
                  "first_result_seconds": summary.first_result_seconds,
                  "stage_ms_per_image": summary.stage_ms_per_image}
    result.update(seconds=time.perf_counter() - start, init_seconds=init,
                  data_start_seconds=data_start)
    ray.shutdown()
    return result


class _Noop:
    def __call__(self, batch):
        return batch


def start_ray() -> tuple[float, float]:
    """Start a local Ray, then Ray Data's per-cluster actors; returns the seconds of each.

    Ray Data starts three detached actors per cluster (stats, autoscaling coordinator, actor
    locations) with the first dataset that uses an actor pool, and every later job on that
    cluster reuses them. Like ``ray.init``, that is start-up: timed apart, and the same for
    both Ray contestants. On 2 cores it costs ~1.3 s, paid by the first job only.
    """
    import ray

    start = time.perf_counter()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    init = time.perf_counter() - start
    start = time.perf_counter()
    pool = ray.data.ActorPoolStrategy(size=1)
    ray.data.range(1).map_batches(_Noop, compute=pool, num_cpus=0.01).materialize()
    return init, time.perf_counter() - start


def _loop(images: str, output: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.decode import decode_image
    from pipeline.listing import list_images
    from pipeline.model import load_model

    start = time.perf_counter()
    model = load_model()
    executor = model.executor(32)
    paths = list_images(images).paths
    labels = []
    for i in range(0, len(paths), 32):
        chunk = paths[i : i + 32]
        batch = np.stack([decode_image(Path(p).read_bytes(), model.spec) for p in chunk])
        labels.append(executor.run(batch)["scores"].argmax(axis=1))
    os.makedirs(output, exist_ok=True)
    pq.write_table(pa.table({"path": paths, "label": np.concatenate(labels).astype(np.int32)}),
                   f"{output}/loop.parquet")
    return {"images": len(paths), "seconds": time.perf_counter() - start, "init_seconds": 0.0,
            "data_start_seconds": 0.0}


def _ray_recipe(images: str, output: str) -> int:
    """Ray Data's documented image batch-inference recipe, with our model dropped in."""
    import ray

    from pipeline.model import load_model

    spec = load_model().spec

    class Classifier:
        def __init__(self):
            import jax

            self.model = load_model()
            self.forward = jax.jit(self.model.forward)

        def __call__(self, batch):
            probs = np.asarray(self.forward(self.model.params, batch["image"].reshape(-1, *spec.shape)))
            return {"path": batch["path"], "label": probs.argmax(axis=1)}

    ds = ray.data.read_images(images, size=(spec.height, spec.width), mode="L", include_paths=True)
    ds = ds.map_batches(Classifier, compute=ray.data.ActorPoolStrategy(size=1), batch_size=32)
    ds.write_parquet(output)
    import pyarrow.parquet as pq

    return pq.read_table(output, columns=["label"]).num_rows


class TreeMemory:
    """Peak summed RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(self.pid))
            self._stop.wait(self.interval)


def _tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_contestant(name: str, images: Path, work: Path) -> dict:
    out = work / f"out_{name}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "pipeline.bench", "--contestant", name, str(images), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(proc.pid)
    stdout, _ = proc.communicate()
    peak = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"bench contestant '{name}' failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    result["images_per_second"] = result["images"] / result["seconds"]
    return result


def end_to_end(count: int, repeats: int, work: Path) -> dict:
    images = make_images(work / "images", count)
    runs: dict[str, list[dict]] = {c: [] for c in CONTESTANTS}
    for _ in range(repeats):
        for name in CONTESTANTS:  # interleaved, so drifts in machine load hit all three alike
            runs[name].append(run_contestant(name, images, work))
    keys = ("images_per_second", "seconds", "init_seconds", "data_start_seconds", "peak_rss_mb")
    med = {name: {key: statistics.median(r[key] for r in rs) for key in keys}
           for name, rs in runs.items()}
    for name, rs in runs.items():  # as if Ray Data's per-cluster actors started in the run
        med[name]["first_job_images_per_second"] = statistics.median(
            r["images"] / (r["seconds"] + r["data_start_seconds"]) for r in rs)
    firsts = [r["first_result_seconds"] for r in runs["pipeline"] if r.get("first_result_seconds")]
    med["pipeline"]["first_result_seconds"] = statistics.median(firsts) if firsts else None
    med["pipeline"]["stage_ms_per_image"] = runs["pipeline"][-1].get("stage_ms_per_image")
    ours = med["pipeline"]
    return {
        "images": count,
        "repeats": repeats,
        "median": med,
        "ratio_vs_loop": ours["images_per_second"] / med["loop"]["images_per_second"],
        "ratio_vs_ray_recipe": ours["images_per_second"] / med["ray_recipe"]["images_per_second"],
        "first_job_ratio_vs_loop": (ours["first_job_images_per_second"]
                                    / med["loop"]["images_per_second"]),
        "runs": runs,
    }


def model_stage(images: np.ndarray, repeats: int = 3, block: int = 1024) -> dict:
    """The model stage alone, images/s: the compiled model called in this process (batches of
    32) vs the pipeline's :class:`Predictor` in a Ray actor, fed the same decoded blocks
    through the object store (its result columns, the crash guard and Ray's calls included).
    ``block``: rows per actor call, the pipeline's block size for small images."""
    import ray

    from pipeline.infer import Predictor
    from pipeline.model import load_model

    executor = load_model().executor(32)
    blocks = [_decoded_block(images[i : i + block], first=i) for i in range(0, len(images), block)]
    start_ray()
    try:
        actor = ray.remote(num_cpus=1)(Predictor).remote(
            None, None, 32, 5, platform="cpu", run_id=f"bench-{os.getpid()}")
        refs = [ray.put(b) for b in blocks]
        ray.get(actor.__call__.remote(refs[0]))  # ready, and warm
        bare, in_actor = [], []
        for _ in range(repeats):  # interleaved
            start = time.perf_counter()
            labels = [executor.run(images[i : i + 32])["scores"].argmax(axis=1)
                      for i in range(0, len(images), 32)]
            bare.append(len(images) / (time.perf_counter() - start))
            start = time.perf_counter()
            results = ray.get([actor.__call__.remote(r) for r in refs])
            in_actor.append(len(images) / (time.perf_counter() - start))
    finally:
        ray.shutdown()
    b, a = statistics.median(bare), statistics.median(in_actor)
    same = np.array_equal(np.concatenate(labels), np.concatenate([r["label"] for r in results]))
    return {"images": len(images), "bare_images_per_second": b,
            "actor_images_per_second": a, "ratio": a / b, "same_labels": bool(same)}


def _decoded_block(images: np.ndarray, first: int) -> dict[str, np.ndarray]:
    """What a decode task hands the actors: the columns of ``decode.decode_rows``."""
    n = len(images)
    return {"image": images, "path": np.array([f"image-{first + i}" for i in range(n)], object),
            "error": np.full(n, "", object), "_t_decode": np.zeros(n)}


def memory_scaling(count: int, factor: int, work: Path) -> dict:
    """Peak memory of the pipeline on ``count`` images and on ``factor`` times as many."""
    small = run_contestant("pipeline", make_images(work / "images", count), work)
    scaled = make_images(work / f"images_x{factor}", count * factor)
    large = run_contestant("pipeline", scaled, work)
    return {"images": count, "factor": factor,
            "peak_rss_mb": small["peak_rss_mb"], "scaled_peak_rss_mb": large["peak_rss_mb"],
            "ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
            "images_per_second": small["images_per_second"],
            "scaled_images_per_second": large["images_per_second"]}


# ---------------------------------------------------------------- report


def format_report(result: dict) -> str:
    lines = []
    seed = result.get("seed")
    if seed:
        lines.append(f"Seed table — bundled CNN on {seed['device']}, {seed['images']} images, "
                     f"batch {seed['batch_size']} (median ms per image)")
        lines.append("  BEFORE (per image, op by op)      AFTER (batch, one compiled program)")
        before, after = list(seed["before_ms_per_image"].items()), list(seed["after_ms_per_image"].items())
        for i in range(max(len(before), len(after))):
            left = f"{before[i][0]:<14}{before[i][1]:>9.4f}" if i < len(before) else ""
            right = f"{after[i][0]:<14}{after[i][1]:>9.4f}" if i < len(after) else ""
            lines.append(f"  {left:<34}{right}")
        lines.append(f"  {'total':<14}{seed['before_total_ms_per_image']:>9.4f}          "
                     f"{'total':<14}{seed['after_total_ms_per_image']:>9.4f}")
        lines.append(f"  speedup per image: {seed['speedup']:.1f}x")
    e2e = result.get("end_to_end")
    if e2e:
        lines.append("")
        lines.append(f"End to end — {e2e['images']} JPEG images 128x96, median of {e2e['repeats']} "
                     "interleaved runs")
        lines.append(f"  {'contestant':<12}{'images/s':>10}{'seconds':>9}{'ray init s':>11}"
                     f"{'data start s':>13}{'peak RSS MB':>13}")
        for name, m in e2e["median"].items():
            lines.append(f"  {name:<12}{m['images_per_second']:>10.0f}{m['seconds']:>9.2f}"
                         f"{m['init_seconds']:>11.2f}{m['data_start_seconds']:>13.2f}"
                         f"{m['peak_rss_mb']:>13.0f}")
        lines.append(f"  pipeline / loop: {e2e['ratio_vs_loop']:.2f}x   "
                     f"pipeline / ray recipe: {e2e['ratio_vs_ray_recipe']:.2f}x")
        lines.append("  a cluster's first Ray Data job also starts its data actors: pipeline / "
                     f"loop {e2e['first_job_ratio_vs_loop']:.2f}x with that time counted")
        first = e2e["median"]["pipeline"].get("first_result_seconds")
        if first is not None:
            lines.append(f"  pipeline: first result {first:.2f}s after pipeline.run() began")
    stage = result.get("model_stage")
    if stage:
        lines.append("")
        lines.append(f"Model stage — {stage['images']} decoded images: bare compiled model "
                     f"{stage['bare_images_per_second']:.0f} images/s, in a Ray actor "
                     f"{stage['actor_images_per_second']:.0f} images/s ({stage['ratio']:.2f}x)")
    scale = result.get("memory_scaling")
    if scale:
        lines.append("")
        lines.append(f"Memory — pipeline peak RSS {scale['peak_rss_mb']:.0f} MB on "
                     f"{scale['images']} images, {scale['scaled_peak_rss_mb']:.0f} MB on "
                     f"{scale['factor']}x as many ({scale['ratio']:.2f}x)")
    return "\n".join(lines)


def bench(images: int = 20_000, repeats: int = 3, seed_images: int = 256,
          work: str | None = None, end_to_end_run: bool = True, model_images: int = 16384,
          memory_factor: int = 0) -> dict:
    """Run the seed table, the model stage, (optionally) the end-to-end comparison and the
    memory check on ``memory_factor`` times the images; returns the JSON result."""
    from pipeline import digits
    from pipeline.model import load_model

    spec = load_model().spec
    _, (x, _) = digits.load_split()
    inputs = digits.model_inputs(x[np.arange(seed_images) % len(x)], spec, size=96)
    result = {"seed": seed_table(inputs, repeats=repeats)}
    if model_images:
        tiled = inputs[np.arange(model_images) % len(inputs)]  # (N, H, W, C) uint8
        result["model_stage"] = model_stage(tiled, repeats=repeats)
    root = Path(work or tempfile.mkdtemp(prefix="batch-infer-bench-"))
    if end_to_end_run:
        result["end_to_end"] = end_to_end(images, repeats, root)
    if memory_factor:
        result["memory_scaling"] = memory_scaling(images, memory_factor, root)
    return result


if __name__ == "__main__":  # one contestant, in its own process (see run_contestant)
    assert sys.argv[1] == "--contestant", "use: batch-infer bench --help"
    print(json.dumps(contestant(sys.argv[2], sys.argv[3], sys.argv[4])))
