"""batch-infer bench: its contestants compute the right thing (its figures are not tested)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow.parquet as pq
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


def test_seed_table_and_report():
    images, _ = digit_images(40)
    table = bench.seed_table(images, repeats=1)
    assert table["images"] == 40 and table["device"].startswith(("cpu", "cuda", "gpu"))
    assert table["speedup"] == table["before_total_ms_per_image"] / table["after_total_ms_per_image"]
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
