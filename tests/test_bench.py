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
from conftest import COMPILES, digit_images
from PIL import Image

from pipeline.bench import format_report, limits, model_cost, seed
from pipeline.bench.contestants import CONTESTANTS, contestant
from pipeline.bench.end_to_end import TreeMemory, measured, summarise, tree_rss
from pipeline.bench.model_stage import model_stage
from pipeline.bench.workload import Setup, decode_sample, image_paths, make_images
from pipeline.model import load_model

RGB_MODEL = "pipeline.bench.photo_cnn:build_small"


@pytest.fixture(scope="module")
def ray_gpu_node():
    """A local Ray that declares one GPU it does not have: the contestants' GPU requests
    (num_gpus=1, gpus_per_actor=1) are scheduled, and platform="cpu" computes on the CPU."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, object_store_memory=256 * 2**20,
             include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_op_by_op_before_path_matches_the_compiled_model():
    model = load_model()
    images, _ = digit_images(8)
    params = jax.device_put(model.params)
    for img, expected in zip(images, model.predict(images)):
        timings, probs = seed._before_one(img, params, model.spec)
        np.testing.assert_allclose(probs[0], expected, atol=1e-5)
        assert set(timings) == set(seed.BEFORE_STAGES) and all(v > 0 for v in timings.values())


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
    table = seed.seed_table(images, repeats=1)
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
    report = format_report({"seed": table})
    for stage in seed.BEFORE_STAGES + seed.AFTER_STAGES:
        assert stage in report
    assert "speedup per image" in report


def _run_all(setup: Setup, images, work) -> dict[str, dict]:
    """Each contestant once, in this process, on the module's Ray; outputs in work/out_NAME."""
    return {name: measured(contestant(name, str(images), str(work / f"out_{name}"), setup), 0)
            for name in CONTESTANTS}


def _labels(output) -> dict[str, int]:
    table = pq.read_table(output, columns=["path", "label"])
    return {os.path.basename(p): v for p, v in
            zip(table.column("path").to_pylist(), table.column("label").to_pylist())}


def test_contestants_label_grayscale_digits_alike(ray_gpu_node, tmp_path):
    """Digits through the bundled (grayscale) CNN: every contestant writes one row per image;
    the loop's labels are the true digits, the pipeline's are the loop's exactly (same
    decode, same compiled program), the recipe's (Ray's read_images resize) nearly so."""
    setup = Setup(workload="digits")
    images = make_images(setup, tmp_path, 48)
    runs = _run_all(setup, images, tmp_path)
    loop = _labels(tmp_path / "out_loop")
    assert len(loop) == 48 and all(r["images"] == 48 for r in runs.values())
    truth = {name: int(name.rsplit("_", 1)[1].split(".")[0]) for name in loop}
    assert np.mean([loop[n] == truth[n] for n in loop]) >= 0.9
    assert _labels(tmp_path / "out_pipeline") == loop
    e2e = summarise({k: [v] for k, v in runs.items()}, setup, tmp_path)
    assert e2e["agreement_vs_loop"]["pipeline"] == 1.0
    assert e2e["agreement_vs_loop"]["ray_recipe"] >= 0.9
    assert e2e["ratio_vs_loop"] == pytest.approx(
        runs["pipeline"]["images_per_second"] / runs["loop"]["images_per_second"])
    e2e["fraction_of_limit"] = {"pipeline": 0.5}
    report = format_report({"end_to_end": e2e})
    assert "pipeline / loop" in report and "agree with the loop's: ray_recipe" in report


def test_contestants_run_an_rgb_model_on_photos_asking_for_gpus(ray_gpu_node, tmp_path):
    """Photo-like JPEGs through an RGB model factory, with the GPU requests a GPU node makes
    (the recipe's actor num_gpus=1, the pipeline's gpus_per_actor=1) on a Ray that declares
    one GPU: both are scheduled, and compute the loop's labels. The decode cost is the
    pipeline's decode_image, whose pixels the loop fed the model."""
    setup = Setup(model_fn=RGB_MODEL, workload="photos", image_size=(96, 72), gpus=1)
    images = make_images(setup, tmp_path, 40)
    runs = _run_all(setup, images, tmp_path)
    assert runs["pipeline"]["plan"]["actor_gpus"] == 1.0
    loop = _labels(tmp_path / "out_loop")
    assert len(loop) == 40 and _labels(tmp_path / "out_pipeline") == loop
    model = setup.load_model()
    paths = image_paths(images)
    decoded, ms = decode_sample(paths, model.spec, repeats=1)
    assert decoded.shape == (40, 32, 32, 3) and ms > 0
    labels = model.predict(decoded).argmax(axis=1)
    assert [loop[os.path.basename(p)] for p in paths] == labels.tolist()
    # The recipe decodes as Ray's read_images does: resize (bilinear, no draft) then convert.
    ray_pixels = np.stack([np.asarray(Image.open(p).resize((32, 32), Image.BILINEAR).convert("RGB"))
                           for p in paths])
    ray_labels = model.predict(ray_pixels).argmax(axis=1)
    recipe = _labels(tmp_path / "out_ray_recipe")
    assert set(recipe) == set(loop)
    assert np.mean([recipe[os.path.basename(p)] == v for p, v in zip(paths, ray_labels)]) >= 0.95


def test_tree_memory_counts_children():
    alone = tree_rss(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import time; x = b'x' * (200 * 2**20); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # its 200 MB are touched by now
        memory = TreeMemory(os.getpid(), interval=0.05)
        time.sleep(0.5)
        assert memory.stop() > alone + 150 * 2**20  # the child's 200 MB counted
    finally:
        child.kill()
        child.wait()


def test_model_stage_runs_the_same_model_bare_and_in_an_actor(ray_gpu_node):
    images, _ = digit_images(96)
    stage = model_stage(Setup(gpus=1), images, repeats=1, block=40)  # 40, 40 and 16 rows
    assert stage["same_answers"] and stage["images"] == 96 and stage["where"] == "ray actor"
    assert stage["bare_images_per_second"] > 0 and stage["predictor_images_per_second"] > 0


def test_limit_formula_on_known_numbers():
    # RESEARCH.md's example: 2 cores, decode 0.81 ms, model 1.07 ms on both cores.
    cpu = limits.limits(cores=2, decode_ms=0.81, model_ms=1.07)
    assert cpu["limit_images_per_second"] == pytest.approx(1000 * 2 / (0.81 + 2 * 1.07))
    assert round(cpu["limit_images_per_second"]) == 678 and cpu["bound"] == "model"
    assert limits.limits(cores=8, decode_ms=2.0, model_ms=0.1)["bound"] == "decode"
    # A GPU node: 15 cores decode at 1.6 ms each (9,375/s) vs 2 GPUs at 0.2 ms (10,000/s).
    gpu = limits.limits(cores=16, decode_ms=1.6, model_ms=0.2, gpus=2, decode_cores=15)
    assert gpu["limit_images_per_second"] == pytest.approx(9375) and gpu["bound"] == "decode"
    assert limits.gpu_limit(15, 1.6, 5000) == 5000
    assert limits.fraction(339, cpu) == pytest.approx(0.5, abs=0.001)


def test_sweep_compiles_each_device_batch_once_and_precision_agrees():
    """Each device batch is compiled when its Executor starts (unit + device batch: one
    program for 32, two for 64), never while it runs; bf16 keeps the digits' top-1."""
    images, _ = digit_images(64)
    model = load_model()
    before = COMPILES.count
    swept = model_cost.sweep(model, Setup(), images, [32, 64], repeats=2)
    assert [r["device_batch"] for r in swept["rows"]] == [32, 64]
    assert [r["compilations"] for r in swept["rows"]] == [1, 2]
    assert COMPILES.count - before == 3, "a call compiled again"
    assert swept["images"] == 256 and swept["saturates_at"] in (32, 64)
    assert all(r["images_per_second"] > 0 for r in swept["rows"])
    assert [r["plan"] for r in swept["rows"]] == [True, False]
    # The plan's device batch is measured even when the sizes asked for leave it out.
    planned = model_cost.sweep(model, Setup(device_batch=96), images, [32, 64], repeats=1)
    assert [(r["device_batch"], r["plan"]) for r in planned["rows"]] == [
        (32, False), (64, False), (96, True)]
    assert "      96" in format_report({"sweep": planned}).split("the plan's")[0].splitlines()[-1]
    p = model_cost.precision(model, Setup(), images, unique=64, repeats=1)
    assert p["compared"] == 64 and p["agreement"] >= 0.9
    assert "bfloat16 vs float32" in format_report({"precision": p, "sweep": swept})


def test_an_embedding_model_is_benched_by_its_vectors(ray_gpu_node, tmp_path):
    """CLIP (a transformers snapshot, tests/reference/clip_tiny): every contestant writes
    each image's embedding; the pipeline's agree with the loop's (cosine >= 0.999), as do the
    Predictor's with the bare model's, and bfloat16's are compared by cosine."""
    from pathlib import Path

    from pipeline.bench import answers
    from pipeline.bench.end_to_end import answers_by_name

    tiny = str(Path(__file__).parent / "reference" / "clip_tiny")
    setup = Setup(model_fn="pipeline.models.clip:build", model=tiny, workload="photos",
                  image_size=(96, 72))
    images = make_images(setup, tmp_path, 24)
    runs = _run_all(setup, images, tmp_path)
    loop = answers_by_name(tmp_path / "out_loop")
    assert len(loop) == 24 and all(v.shape == (24,) for v in loop.values())
    e2e = summarise({k: [v] for k, v in runs.items()}, setup, tmp_path)
    assert e2e["agreement_vs_loop"]["pipeline"] == 1.0
    assert 0 <= e2e["agreement_vs_loop"]["ray_recipe"] <= 1  # Ray's own resize: other pixels
    assert len(answers_by_name(tmp_path / "out_ray_recipe")) == 24

    model = setup.load_model()
    decoded, _ = decode_sample(image_paths(images), model.spec, repeats=1)
    stage = model_stage(setup, decoded, repeats=1, block=16)
    assert stage["same_answers"]
    p = model_cost.precision(model, setup, decoded, unique=24, repeats=1)
    assert p["answers"] == "embeddings" and p["min_cosine"] > 0.9
    report = format_report({"precision": p, "model_stage": stage})
    assert "embeddings agree (cosine >= 0.99)" in report and "same answers: yes" in report
    # A different image's embedding is not "the same answer".
    vectors = np.stack(list(loop.values()))
    assert not answers.agree(vectors[:1], vectors[1:2])[0]
