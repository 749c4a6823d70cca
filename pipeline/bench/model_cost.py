"""What the model costs on this process's device, apart from decode and Ray.

* **cost**: images/s of the compiled model at the plan's device batch
  (:class:`pipeline.device.Executor`, batches in flight), on every core XLA:CPU takes or on
  one GPU; the model term of the machine's limit (:mod:`pipeline.bench.limits`).
* **sweep**: the same per device batch (``--sweep 32,64,128,256,512``), each size compiled
  once (an Executor compiles its unit and device-batch programs at start, never again), so
  one sees where throughput stops growing.
* **precision**: bfloat16 vs float32 compute (params cast once, outputs float32): images/s
  and how often the top-1 label agrees.

:func:`device_section` runs them all (and the seed table) in one process: on a GPU node
that process is a child, so that the bench's own process never starts CUDA.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from pipeline.bench import answers
from pipeline.bench.workload import Setup, tiled


def rate(executor, images: np.ndarray, repeats: int) -> float:
    """Median images/s of ``executor.run(images)`` over ``repeats``, after one warm call."""
    executor.run(images[: executor.device_batch])
    rates = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        executor.run(images)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates)


def _executor(model, setup: Setup, device_batch: int, compute_dtype: str = "float32"):
    from pipeline.device import Executor

    return Executor(model.program(top_k=1, compute_dtype=compute_dtype),
                    model.compute_params(compute_dtype), model.spec.shape, setup.batch_size,
                    device_batch)


def cost(model, setup: Setup, images: np.ndarray, repeats: int) -> dict:
    """The model alone at the setup's device batch: images/s and ms per image."""
    executor = _executor(model, setup, setup.device_batch)
    per_second = rate(executor, images, repeats)
    return {"device": executor.describe(), "device_batch": setup.device_batch,
            "images": len(images), "images_per_second": per_second,
            "ms_per_image": 1000 / per_second, "compile_seconds": executor.compile_seconds}


def sweep(model, setup: Setup, images: np.ndarray, sizes: list[int], repeats: int) -> dict:
    """images/s per device batch, the plan's (``setup.device_batch``) among them whether
    asked for or not: a sweep that leaves out what the runs use cannot say whether it is
    right. ``images`` is tiled to at least 4 of the largest batch."""
    sizes = sorted({*sizes, setup.device_batch})
    images = tiled(images, max(len(images), 4 * max(sizes)))
    rows = []
    for size in sizes:
        executor = _executor(model, setup, size)
        per_second = rate(executor, images, repeats)
        rows.append({"device_batch": size, "images_per_second": per_second,
                     "ms_per_image": 1000 / per_second, "compilations": executor.compilations,
                     "compile_seconds": executor.compile_seconds,
                     "plan": size == setup.device_batch})
    best = max(r["images_per_second"] for r in rows)
    # Where it stops growing: the smallest batch within 5% of the best.
    saturates = next(r["device_batch"] for r in rows if r["images_per_second"] >= 0.95 * best)
    return {"images": len(images), "rows": rows, "saturates_at": saturates}


def precision(model, setup: Setup, images: np.ndarray, unique: int, repeats: int) -> dict:
    """bfloat16 vs float32 at the setup's device batch, interleaved; how often the answers
    agree on the first ``unique`` images (the distinct ones; the rest repeat them): the top-1
    label, or an embedding within ``answers.BF16_COSINE``."""
    runs = {d: _executor(model, setup, setup.device_batch, d) for d in ("float32", "bfloat16")}
    for executor in runs.values():
        executor.run(images[: setup.device_batch])  # warm
    rates: dict[str, list[float]] = {d: [] for d in runs}
    for _ in range(max(1, repeats)):
        for dtype, executor in runs.items():
            start = time.perf_counter()
            executor.run(images)
            rates[dtype].append(len(images) / (time.perf_counter() - start))
    out = {d: runs[d].run(images[:unique]) for d in runs}
    f32, bf16 = (statistics.median(rates[d]) for d in ("float32", "bfloat16"))
    full, low = (answers.of(out[d]) for d in ("float32", "bfloat16"))
    result = {
        "device": runs["float32"].describe(), "images": len(images), "compared": unique,
        "float32_images_per_second": f32, "bfloat16_images_per_second": bf16,
        "speedup": bf16 / f32, "answers": answers.describe(model.spec),
        "agreement": float(np.mean(answers.agree(full, low, answers.BF16_COSINE))),
    }
    if full.ndim == 1:
        result["max_top1_score_diff"] = float(np.max(np.abs(
            out["float32"]["topk_scores"][:, 0] - out["bfloat16"]["topk_scores"][:, 0])))
    else:
        result["min_cosine"] = float(answers.cosines(full, low).min())
    return result


def device_section(setup: str, inputs: str, count: int, repeats: int, seed_images: int = 0,
                   sweep_sizes: list[int] | None = None, with_precision: bool = True,
                   predictor: bool = False) -> dict:
    """Seed table, model cost, sweep, bf16 vs f32 (and, with ``predictor``, the Predictor
    in this process vs the bare model) on this process's device. Arguments are JSON-able:
    ``setup`` is :meth:`Setup.to_json`, ``inputs`` a .npy of decoded distinct images."""
    from pipeline.platforms import configure

    setup = Setup.from_json(setup)
    configure(setup.platform)
    model = setup.load_model()
    unique = np.load(inputs)  # (U, H, W, C) uint8
    images = tiled(unique, max(count, 4 * setup.device_batch))
    result: dict = {}
    if seed_images:
        from pipeline.bench.seed import seed_inputs, seed_table

        result["seed"] = seed_table(seed_inputs(seed_images), repeats=repeats)
    result["model_cost"] = cost(model, setup, images, repeats)
    if sweep_sizes:
        result["sweep"] = sweep(model, setup, images, list(sweep_sizes), repeats)
    if with_precision:
        result["precision"] = precision(model, setup, images, min(len(unique), len(images)),
                                        repeats)
    if predictor:
        from pipeline.bench.model_stage import predictor_in_process

        result["predictor"] = predictor_in_process(setup, images, repeats)
    return result


def save_inputs(images: np.ndarray, work: Path) -> str:
    path = work / "decoded_inputs.npy"
    np.save(path, images)
    return str(path)
