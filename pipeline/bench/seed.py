"""The seed's before/after table, on the bundled digits CNN.

"Before": each image on its own, host->device transfer, then the layers as separate
un-jitted ops (normalise, Conv, BiasAdd, ReLU, Conv, BiasAdd, ReLU, Dense), device->host
transfer, every stage timed after ``block_until_ready``. "After": batches of 32, one transfer
in, the AOT-compiled fused program, one transfer out (:meth:`pipeline.device.Executor.run_serial`,
each stage waited for, as the seed times it).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

BEFORE_STAGES = ("transfer_in", "normalise", "conv1", "bias1", "relu1", "conv2", "bias2", "relu2",
                 "dense", "transfer_out")
AFTER_STAGES = ("transfer_in", "compute", "transfer_out")


def seed_inputs(count: int) -> np.ndarray:
    """``count`` held-out digits rendered at 96 px and decoded to the bundled model's input."""
    from pipeline import digits
    from pipeline.model import load_model

    _, (x, _) = digits.load_split()
    return digits.model_inputs(x[np.arange(count) % len(x)], load_model().spec, size=96)


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
