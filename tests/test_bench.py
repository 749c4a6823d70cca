"""batch-infer bench: its contestants compute the right thing (its figures are not tested)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import digit_images

from pipeline import bench
from pipeline.model import load_model


def test_op_by_op_before_path_matches_the_compiled_model():
    model = load_model()
    images, _ = digit_images(8)
    params = jax.device_put(model.params)
    for img, expected in zip(images, model.predict(images)):
        timings, probs = bench._before_one(img, params, model.spec)
        np.testing.assert_allclose(probs[0], expected, atol=1e-5)
        assert set(timings) == set(bench.BEFORE_STAGES) and all(v > 0 for v in timings.values())


def _ms_per_image(run, images: np.ndarray, step: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the wall time per image of ``run`` on ``step`` images at once."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), step):
            run(images[i : i + step])
        times.append(1000 * (time.perf_counter() - start) / len(images))
    return statistics.median(times)


def test_seed_table_and_report():
    """The table's speedup agrees with one timed here another way: the model applied eagerly
    (JAX op by op, not jitted) to one image at a time vs jitted on batches of 32, each with
    its transfers. Its totals are the sums of its stages, and the time it reports for the
    op-by-op path fits in the time the call took. Rules out a swapped ratio, a "before" path
    that is secretly compiled (one image per call: ~4x on the 2-core CPU, where this test
    times ~25x) or batched, per-image figures divided by the wrong count (timing a sample of
    the images: ~1x), and totals that are not their stages' sum."""
    images, _ = digit_images(64)
    start = time.perf_counter()
    table = bench.seed_table(images, repeats=1)
    wall_ms = 1000 * (time.perf_counter() - start)
    assert table["images"] == 64 and table["device"].startswith(("cpu", "cuda", "gpu"))
    before, after = table["before_total_ms_per_image"], table["after_total_ms_per_image"]
    assert before == pytest.approx(sum(table["before_ms_per_image"].values()))
    assert after == pytest.approx(sum(table["after_ms_per_image"].values()))
    assert before * len(images) < wall_ms, "more op-by-op time reported than the call took"
    assert table["speedup"] == pytest.approx(before / after)

    model = load_model()
    params = jax.device_put(model.params)
    jitted = jax.jit(model.forward)

    def eager(x):
        return np.asarray(model.forward(params, jax.device_put(x)))

    def compiled(x):
        return np.asarray(jitted(params, jax.device_put(x)))

    eager(images[:1]), compiled(images[:32])  # warm: kernels, compilation
    ratio = _ms_per_image(eager, images, 1) / _ms_per_image(compiled, images, 32, repeats=9)
    assert ratio > 3, f"the test's own timing finds batching only {ratio:.1f}x faster"
    # Both are noisy (a shared machine): agreement within 4x either way, not to the digit.
    assert ratio / 4 < table["speedup"] < ratio * 4, (
        f"table says {table['speedup']:.1f}x, timed here {ratio:.1f}x")
    report = bench.format_report({"seed": table})
    for stage in bench.BEFORE_STAGES + bench.AFTER_STAGES:
        assert stage in report
    assert "speedup per image" in report


def test_loop_contestant_labels_every_image(tmp_path):
    images = bench.make_images(tmp_path / "images", 40)
    result = bench.contestant("loop", str(images), str(tmp_path / "out"))
    assert result["images"] == 40 and result["seconds"] > 0
    table = pq.read_table(tmp_path / "out")
    labels = [int(p.rsplit("_", 1)[1].split(".")[0]) for p in table.column("path").to_pylist()]
    assert (np.array(labels) == table.column("label").to_numpy()).mean() >= 0.9


def test_tree_memory_counts_children():
    alone = bench._tree_rss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = b'x' * (200 * 2**20); time.sleep(3)"])
    try:
        memory = bench.TreeMemory(os.getpid(), interval=0.05)
        time.sleep(1.5)
        assert memory.stop() > alone + 150 * 2**20  # the child's 200 MB (touched) counted
    finally:
        child.kill()
        child.wait()


def test_model_stage_runs_the_same_model_bare_and_in_an_actor():
    images, _ = digit_images(96)
    stage = bench.model_stage(images, repeats=1, block=40)  # blocks of 40, 40 and 16 rows
    assert stage["same_labels"] and stage["images"] == 96
    assert stage["bare_images_per_second"] > 0 and stage["actor_images_per_second"] > 0
