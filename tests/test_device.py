"""The device layer (pipeline/device.py) and the GPU path's guarantees, proved on CPU.

JAX can fake several CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``,
set before JAX starts: those tests run a child process). A device that breaks is simulated
by tests/poison_model.py's ``break`` mode: every call of a process raises after a few, as a
GPU does once its context is lost, and the canary batch fails with it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import poison_model
import pyarrow.parquet as pq
import pytest
from conftest import COMPILES, digit_images, finishes
from PIL import Image

import pipeline
from pipeline.device import DeviceFailure, Executor
from pipeline.digits import write_samples
from pipeline.model import Model, ModelError, ModelSpec, keeps_float32, load_model
from pipeline.platforms import DeviceError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_in_flight_results_equal_the_serial_path(model):
    """Batches in flight give exactly what one call at a time, each waited for, gives, when
    both run the same program (device batch = unit); with a device batch of 64 the same
    labels, and scores to float32 rounding: XLA may block a 64-row convolution otherwise
    than a 32-row one (JAX 0.12 on CPU does, by up to 6e-6 in a logit)."""
    images, _ = digit_images(300)
    program = model.program(top_k=3, logits=True)
    for device_batch in (32, 64):
        fast = Executor(program, model.params, model.spec.shape, 32, device_batch=device_batch)
        out = fast.run(images)
        serial, seconds = fast.run_serial(images)
        assert set(out) == {"ok", "topk_scores", "topk_labels", "logits"}
        for k in out:
            if device_batch == 32 or out[k].dtype.kind != "f":
                np.testing.assert_array_equal(out[k], serial[k], err_msg=k)
            else:
                np.testing.assert_allclose(out[k], serial[k], rtol=1e-5, atol=1e-5, err_msg=k)
        assert fast.seconds["dispatch"] > 0 and fast.seconds["wait"] >= 0
        assert all(v > 0 for v in seconds.values())


_RUN_AND_EXIT = """
import numpy as np
from pipeline.model import load_model
model = load_model()
model.executor(32).run(np.zeros((256, *model.spec.shape), np.uint8))
"""


def test_a_process_that_ran_batches_exits_cleanly():
    """Rules out results copied back early on the CPU, where they already are: under JAX 0.11
    that copy runs on a thread nothing joins, and about one process in five that exits right
    after a run aborts ("terminate called without an active exception", exit -6). One after
    another: run side by side, they slow each other enough that the copy ends in time."""
    for _ in range(6):
        proc = subprocess.run([sys.executable, "-c", _RUN_AND_EXIT], cwd=REPO, timeout=300,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.returncode == 0, proc.stderr[-500:]


def test_device_batch_is_compiled_once_beside_the_unit_and_tails_never_recompile(model):
    """A wrong implementation compiles a tail's shape (a third program), or pads a 1-row tail
    to the device batch; either is caught here: two compiles, then none for any length."""
    images, _ = digit_images(300)
    before = COMPILES.count
    executor = Executor(model.program(top_k=5), model.params, model.spec.shape, 32,
                        device_batch=128)
    assert COMPILES.count - before == 2 and executor.compilations == 2
    reference = model.executor(32)
    after = COMPILES.count
    for n in (128, 300, 31, 1, 129, 256):
        got = executor.run(images[:n])
        want = reference.run(images[:n])["scores"]
        order = np.argsort(-want, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(got["topk_labels"], order)
        np.testing.assert_allclose(got["topk_scores"], np.take_along_axis(want, order, 1),
                                   rtol=1e-5)  # 128- and 32-row programs may round apart
    assert COMPILES.count == after, "a tail recompiled"
    assert [hi - lo for lo, hi in executor._chunks(300)] == [128, 128, 32, 12]


def test_bisection_finds_one_image_inside_a_device_batch(tmp_path):
    """One poison image among 200, device batches of 64: only that image is an error row,
    and everything else equals a clean run (retrying the batch one image at a time would
    give the same rows, so the number of calls is checked too)."""
    calls = tmp_path / "calls"
    poison = poison_model.build(poison_model.write_options(
        tmp_path / "o.json", mode="raise", calls=str(calls)))
    images, _ = digit_images(200)
    images[70] = poison_model.DEFAULTS["marker"]  # a solid gray square: poison
    executor = Executor(poison.program(top_k=5), poison.params, poison.spec.shape, 32, 64)
    calls.unlink()
    out, errors = executor.run_isolating(images)
    assert [i for i, e in enumerate(errors) if e] == [70]
    assert "poison image in batch" in errors[70]
    clean = load_model().executor(32).run(np.delete(images, 70, axis=0))["scores"]
    np.testing.assert_array_equal(np.delete(out["topk_labels"][:, 0], 70), clean.argmax(1))
    real = [c.images for c in poison_model.read_calls(calls) if c.images]  # canaries: 0
    # 4 device batches (64, 64, 64, 8 rows); the failing one is cut into unit pieces of 32,
    # and the failing piece halved down to the image: each level runs the half holding it
    # first, then its sibling. One image at a time would make 64 calls of the failing batch.
    assert real == [64, 64, 64, 8, 32, 16, 8, 4, 4, 2, 2, 1, 1, 8, 16, 32]


def test_a_broken_device_is_not_a_bad_image(tmp_path):
    """After a failing call the canary fails too: DeviceFailure, never error rows."""
    broken = poison_model.build(poison_model.write_options(
        tmp_path / "o.json", mode="break", break_after=1, breaks=str(tmp_path / "b")))
    images, _ = digit_images(64)
    executor = Executor(broken.program(top_k=5), broken.params, broken.spec.shape, 32)
    with pytest.raises(DeviceFailure, match="canary batch.*broken, not the data"):
        executor.run_isolating(images)


def test_top_k_on_the_device_matches_the_host_columns(model):
    images, _ = digit_images(100)
    probs = model.executor(32).run(images)["scores"]  # (N, 10)
    top = Executor(model.program(top_k=4), model.params, model.spec.shape, 32).run(images)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(top["topk_labels"], order)
    assert top["topk_labels"].dtype == np.int32 and top["topk_scores"].shape == (100, 4)
    assert "scores" not in top  # only k numbers per row come back


def test_bfloat16_casts_params_once_and_keeps_normalisation_in_float32():
    rng = np.random.default_rng(0)
    params = {"conv": {"w": rng.standard_normal((3, 3, 3, 8)).astype(np.float32)},
              "BatchNorm_0": {"scale": np.ones(8, np.float32), "mean": np.zeros(8, np.float32)},
              "bn1.running_var": np.ones(8, np.float32), "ln_f": {"bias": np.zeros(8, np.float32)},
              "head": {"kernel": rng.standard_normal((8, 2)).astype(np.float32)},
              "steps": np.zeros((), np.int32)}

    def apply(p, x):  # (B, 4, 4, 3)
        import jax.numpy as jnp

        h = jnp.einsum("bhwc,ijcd->bhwd", x, p["conv"]["w"][:1, :1])
        h = (h - p["BatchNorm_0"]["mean"]) / jnp.sqrt(p["bn1.running_var"])
        h = h * p["BatchNorm_0"]["scale"] + p["ln_f"]["bias"]
        return h.mean(axis=(1, 2)) @ p["head"]["kernel"]

    m = Model(apply=apply, params=params, spec=ModelSpec(4, 4, 3, class_names=("a", "b")))
    cast = m.compute_params("bfloat16")
    assert cast["conv"]["w"].dtype.name == "bfloat16" and cast["head"]["kernel"].dtype.name == "bfloat16"
    assert cast["BatchNorm_0"]["scale"].dtype == np.float32 and cast["ln_f"]["bias"].dtype == np.float32
    assert cast["bn1.running_var"].dtype == np.float32 and cast["steps"].dtype == np.int32
    assert not keeps_float32("['conv']['w']") and keeps_float32("['LayerNorm_3']['scale']")
    import jax

    x = jax.ShapeDtypeStruct((32, 4, 4, 3), np.uint8)
    jaxpr = jax.make_jaxpr(m.program(top_k=1, compute_dtype="bfloat16"))(cast, x)
    converts = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"]
    # The input, the mixed float32/bfloat16 arithmetic and the output: not one per parameter
    # (a program that casts its weights on every call has a convert per weight).
    weights = set(jaxpr.jaxpr.invars[:-1])  # every parameter leaf; the last is the images
    assert converts and not [e for e in converts if e.invars[0] in weights]
    executor = Executor(m.program(top_k=1, compute_dtype="bfloat16"), cast, (4, 4, 3), 32)
    placed = [a.dtype for a in jax.tree_util.tree_leaves(executor.params)]
    assert placed == [a.dtype for a in jax.tree_util.tree_leaves(cast)]
    assert params["conv"]["w"].dtype == np.float32  # the stored weights, and the fingerprint
    assert m.fingerprint == Model(apply=apply, params=params, spec=m.spec).fingerprint


SHARDED = textwrap.dedent("""
    import json, numpy as np, jax
    from pipeline.device import Executor
    from pipeline.model import load_model
    assert len(jax.devices()) == 2, jax.devices()
    found = {}
    # The digits CNN (convs) and a small CLIP (a ViT: attention, blocks under lax.scan).
    for name, path, fn in (("digits", None, None),
                           ("clip", "tests/reference/clip_tiny", "pipeline.models.clip:build")):
        m = load_model(path, fn)
        x = np.random.default_rng(0).integers(0, 256, (200, *m.spec.shape), np.uint8)
        top_k = 5 if m.spec.output == "classification" else None
        one = Executor(m.program(top_k=top_k, logits=top_k is not None), m.params,
                       m.spec.shape, 32, 64, devices=jax.devices()[:1]).run(x)
        two = Executor(m.program(top_k=top_k, logits=top_k is not None), m.params,
                       m.spec.shape, 32, 64, devices=jax.devices())
        out = two.run(x)
        compiled, sharding = two._programs[64]
        found[name] = {
            "same": all(np.array_equal(one[k], out[k]) for k in one),
            "close": all(np.allclose(one[k], out[k], atol=1e-5) for k in one),
            "input_devices": len(compiled.input_shardings[0][1].device_set),
            "partitions": compiled.as_text().count("num_partitions=2"),
            "params_devices": len(jax.tree_util.tree_leaves(two.params)[0].sharding.device_set),
            "spec": str(sharding.spec),
        }
    print(json.dumps(found))
""")


def test_two_devices_shard_each_device_batch_and_agree_with_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                            text=True, timeout=300, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found) == {"digits", "clip"}
    for got in found.values():
        assert got["close"], got  # a row split over two devices computes the same numbers
        assert got["input_devices"] == 2 and got["params_devices"] == 2  # replicated once
        assert got["partitions"] >= 1 and got["spec"] in ("P('data',)", "PartitionSpec('data',)")


def _mixing_apply(params, x):  # (B, H, W, C): subtracts the batch mean, like BatchNorm training
    return (x - x.mean(axis=0, keepdims=True)).mean(axis=(1, 2)) @ params["w"]


def mixing_model(path: str | None = None) -> Model:
    """Model factory: a model whose rows influence each other (batch statistics)."""
    return Model(apply=_mixing_apply, params={"w": np.array([[1.0, 2.0, 3.0]], np.float32)},
                 spec=ModelSpec(8, 8, 1, class_names=("a", "b", "c")), name="mixing")


def test_a_model_whose_rows_mix_is_refused_at_start():
    from pipeline.infer import Predictor

    with pytest.raises(ModelError, match=r"row 0's outputs change .* inference mode"):
        Predictor(None, "test_device:mixing_model", 8, 3)
    flax = pytest.importorskip("flax")
    assert flax  # and a real framework's BatchNorm left in training mode
    with pytest.raises(ModelError, match=r"row 0's outputs change"):
        Predictor(None, "test_frameworks:linen_in_training_mode", 8, 3)


# --- on a Ray cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """2 CPUs and one declared (logical) GPU, on loopback; tests/ importable by workers."""
    import ray

    ray.shutdown()
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = poison_model.worker_env()["PYTHONPATH"]
    ctx = ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                   object_store_memory=200 * 1024**2, _node_ip_address="127.0.0.1",
                   logging_level="WARNING")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


def test_a_gpu_actor_without_a_usable_gpu_stops_the_run_quickly(ray_with_a_gpu, tmp_path):
    """Ray grants the GPU, but this jaxlib has no CUDA: the run stops within seconds with one
    line naming the node and the fix, and writes nothing (no silent CPU fallback)."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 20, seed=1)
    start = time.monotonic()
    with pytest.raises(DeviceError) as err:
        pipeline.run(str(src), str(out), gpus_per_actor=1)
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "\n" not in message and "node 127.0.0.1" in message
    assert "JAX finds no gpu device" in message and "pip install 'jax[cuda12]'" in message
    assert not list(out.glob("part-*"))  # the listing and manifest stay; the rerun replaces them
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--input", str(src), "--output",
         str(out), "--gpus-per-actor", "1", "--address", ray_with_a_gpu],
        capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines()[-1].startswith("batch-infer: error: node 127.0.0.1")
    # The documented override: reserve the GPU, compute on the CPU.
    summary = pipeline.run(str(src), str(out), gpus_per_actor=1, platform="cpu")
    assert summary.rows_ok == 20 and summary.plan["actor_gpus"] == 1


def test_a_device_that_breaks_is_replaced_and_no_row_is_lost(ray_with_a_gpu, tmp_path):
    src, out, breaks = tmp_path / "in", tmp_path / "out", tmp_path / "breaks"
    write_samples(src, 120, seed=4)
    options = poison_model.write_options(
        tmp_path / "o.json", mode="break", break_after=6, breaking_processes=1,
        breaks=str(breaks), calls=str(tmp_path / "calls"))
    summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                           batch_size=8, actors=1, progress=False)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 120 == len({r["path"] for r in rows})
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]][:3]
    assert summary.rows_ok == 120 and summary.rows_error == 0
    (broke,) = breaks.iterdir()  # one process broke, and was replaced
    pids = {c.pid for c in poison_model.read_calls(tmp_path / "calls")}
    assert int(broke.name) in pids and len(pids) == 2


def test_a_device_that_never_recovers_ends_the_run_with_one_clear_failure(
        ray_with_a_gpu, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 60, seed=4)
    options = poison_model.write_options(
        tmp_path / "o.json", mode="break", break_after=4, breaks=str(tmp_path / "breaks"))
    with pytest.raises(DeviceFailure, match=r"the device failed 3 times in this actor"):
        pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                     batch_size=8, actors=1, progress=False)
    assert not out.exists() or not list(out.glob("part-*"))  # no thousands of error rows
    assert len(list((tmp_path / "breaks").iterdir())) == 3  # three processes, then stop


def test_a_device_that_hangs_for_good_ends_the_run_with_one_clear_failure(
        ray_with_a_gpu, tmp_path):
    """A call neither returns nor raises (a stuck GPU context), and the run used to wait for
    ever. The watchdog kills the process after --infer-timeout; once stuck, the device stays
    stuck, so each replacement hangs on its canary batch at start. After three such
    processes the run stops with the device's error, and no image is written off as an
    error row. (A device that comes back is the next test's first kill: the replacement's
    canary passes and the block's other images are all ok.)"""
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 60, seed=4)
    options = poison_model.write_options(
        tmp_path / "o.json", mode="stuck", break_after=6, breaks=str(tmp_path / "breaks"))
    with pytest.raises(DeviceFailure) as err:
        finishes(150, lambda: pipeline.run(
            str(src), str(out), model_fn="poison_model:build", model=options, batch_size=8,
            actors=1, progress=False, infer_timeout=1))
    assert re.fullmatch(
        r"node 127\.0\.0\.1 \(.*\): the device failed 3 times in this actor, each time in a "
        r"fresh process; giving up: the device gave no result for 1 s running the canary batch "
        r"at start \(cpu \(1 x cpu\)\): it hangs", str(err.value)), str(err.value)
    assert not out.exists() or not list(out.glob("part-*"))


def test_an_image_that_hangs_the_model_is_one_error_row(ray_with_a_gpu, tmp_path):
    """A model caught in an endless loop on one image: the watchdog kills the process, the
    replacement runs the block one image at a time, and the image that hung twice is an
    error row that says so; every other row is ok."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 60, seed=4)
    poison = src / "poison" / "loops.png"
    poison.parent.mkdir()
    Image.new("L", (28, 28), poison_model.DEFAULTS["marker"]).save(poison)
    options = poison_model.write_options(tmp_path / "o.json", mode="hang")
    summary = finishes(150, lambda: pipeline.run(
        str(src), str(out), model_fn="poison_model:build", model=options, batch_size=8,
        actors=1, progress=False, infer_timeout=1))
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 61
    bad = [r for r in rows.values() if r["status"] != "ok"]
    assert [(r["path"], r["error_kind"]) for r in bad] == [(str(poison), "model_crash")]
    assert bad[0]["error"] == (
        "the inference process was killed predicting this image (2 times): no result for over "
        "1 s (--infer-timeout); the model hangs on it")
    assert (summary.rows_ok, summary.rows_error) == (60, 1)


DRIVER = textwrap.dedent("""
    import json, sys
    import pipeline
    summary = pipeline.run(sys.argv[1], sys.argv[2])
    import jax
    from jax._src import xla_bridge
    print(json.dumps({"backends": sorted(xla_bridge._backends), "ok": summary.rows_ok,
                      "platforms": jax.config.jax_platforms}))
""")


def test_the_driver_initialises_no_backend_but_the_cpu(tmp_path):
    """The driver traces and lowers the model (for the actors' platform) and leaves every
    accelerator alone: its JAX is pinned to the CPU before anything starts it."""
    write_samples(tmp_path / "in", 10, seed=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "in"),
                             str(tmp_path / "out")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got == {"backends": ["cpu"], "ok": 10, "platforms": "cpu"}


def test_a_jax_upgrade_still_resumes_but_a_changed_model_does_not(ray_local, tmp_path):
    """The manifest keeps the model's identity in parts. Under another JAX the traced program
    may print differently: same weights, spec and source files resume, and the new rows keep
    the manifest's fingerprint; a changed weight, or another program under the same JAX, is
    refused."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 24, seed=2)
    pipeline.run(str(src), str(out), rows_per_file=8)
    manifest_path = out / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    parts = sorted(out.glob("part-*.parquet"))
    for part in parts[1:]:
        part.unlink()  # as if interrupted
    old = "0123456789abcdef"  # what an older JAX traced the same model to
    manifest["model"] = old
    manifest["model_identity"].update(fingerprint=old, program="0" * 64, jax="0.4.30")
    manifest_path.write_text(json.dumps(manifest))
    summary = pipeline.run(str(src), str(out), rows_per_file=8, resume=True)
    assert summary.rows_ok == 24 and summary.model == old
    table = pq.read_table(out)
    assert table.num_rows == 24
    new_rows = [r for r in table.to_pylist() if r["path"] not in
                set(pq.read_table(parts[0]).column("path").to_pylist())]
    assert {r["model"] for r in new_rows} == {old}

    same_jax = dict(manifest["model_identity"], jax=load_model().identity.jax)
    manifest_path.write_text(json.dumps({**manifest, "model_identity": same_jax}))
    with pytest.raises(pipeline.write.OutputError, match="the computation differs"):
        pipeline.run(str(src), str(out), resume=True)
    changed = dict(manifest["model_identity"], weights="f" * 64)
    manifest_path.write_text(json.dumps({**manifest, "model_identity": changed}))
    with pytest.raises(pipeline.write.OutputError, match="the weights differ"):
        pipeline.run(str(src), str(out), resume=True)
