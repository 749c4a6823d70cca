"""batch-infer gpu-check, and the bench's GPU plumbing: device probe, child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.bench import gpu, limits

EXPECTED_KEYS = {"gpu", "quick", "devices", "nvidia_smi", "notes", "pytest", "seed", "decode",
                 "model_cost", "sweep", "precision", "predictor", "limits", "pipeline_run",
                 "plan", "setup", "model", "ok", "failures"}


def test_probe_counts_devices_in_a_child():
    """JAX is asked in a child process (so the caller never starts CUDA); with three fake
    CPU devices it sees three, and no GPU."""
    seen = gpu.probe(env={"JAX_PLATFORMS": "cpu",
                          "XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
    assert seen["error"] is None and seen["gpu"] is False
    assert seen["platform"] == "cpu" and seen["count"] == 3 and len(seen["devices"]) == 3
    broken = gpu.probe(env={"JAX_PLATFORMS": "no_such_platform"})
    assert broken["gpu"] is False and broken["count"] == 0 and broken["error"]


def test_in_child_returns_what_the_function_returns():
    here = limits.limits(cores=2, decode_ms=0.81, model_ms=1.07)
    assert gpu.in_child("pipeline.bench.limits:limits", cores=2, decode_ms=0.81,
                        model_ms=1.07) == here
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        gpu.in_child("pipeline.bench.limits:limits", cores=0, decode_ms=0, model_ms=0)


def test_sections_run_in_a_child_on_one_gpu_when_the_setup_computes_on_a_gpu(
        tmp_path, monkeypatch):
    """A setup that computes on a GPU runs its measurements in a child process that sees one
    GPU (here JAX finds none and computes on the CPU: the child's plumbing is what is
    tested), and their JSON comes back whole."""
    from conftest import digit_images

    from pipeline.bench import section
    from pipeline.bench.model_cost import save_inputs
    from pipeline.bench.workload import Setup

    setup = Setup(platform="gpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert section(setup, "os:getenv", key="CUDA_VISIBLE_DEVICES") == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert section(setup, "os:getenv", key="CUDA_VISIBLE_DEVICES") == "0"
    assert section(Setup(), "os:getpid") == os.getpid()  # a CPU setup: here
    images, _ = digit_images(40)
    result = section(setup, "pipeline.bench.model_cost:device_section", setup=setup.to_json(),
                     inputs=save_inputs(images, tmp_path), count=64, repeats=1,
                     with_precision=False)
    assert result["model_cost"]["device_batch"] == 32 and result["model_cost"]["images"] == 128


_BENCH_PARENT = """
import json, sys
from pathlib import Path

import jax

from pipeline.bench import prepare, section

setup, result = prepare(Path(sys.argv[1]), model_fn=None, model=None, workload="photos",
                        image_size=(160, 120), images=64, repeats=1)
device = section(setup, "pipeline.bench.model_cost:device_section", setup=setup.to_json(),
                 inputs=result["_inputs"], count=1024, repeats=1, seed_images=32,
                 sweep_sizes=[32, 64], predictor=True)
here = sorted({d.platform for d in jax.devices()})
print(json.dumps({"setup": setup.to_json(), "device": device, "here": here}))
"""


@pytest.mark.gpu
def test_gpu_bench_runs_every_part_on_the_gpu(tmp_path, monkeypatch):
    """On a GPU node: the bench's own process stays on the CPU while its device section (a
    child) computes on the GPU; the loop and the pipeline compute on it too, and agree."""
    from pipeline.bench.end_to_end import agreement, run_contestant
    from pipeline.bench.workload import Setup, make_images

    # This pytest process already started CUDA (conftest asks JAX for GPUs): its children
    # share what is left instead of each asking for 75% of the card.
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    proc = subprocess.run([sys.executable, "-c", _BENCH_PARENT, str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["here"] == ["cpu"], "the bench's own process started a GPU"
    setup = Setup.from_json(out["setup"])
    assert setup.gpus >= 1 and setup.platform == "gpu"
    assert setup.device_batch > setup.batch_size  # the plan's GPU device batch
    device = out["device"]
    for key in ("seed", "model_cost", "precision", "predictor"):
        assert device[key]["device"].startswith("gpu"), (key, device[key]["device"])
    assert device["predictor"]["same_answers"]
    images = make_images(setup, tmp_path, 64)
    loop = run_contestant("loop", images, tmp_path, setup)
    assert loop["device"].startswith("gpu")
    run = run_contestant("pipeline", images, tmp_path, setup)
    assert run["plan"]["actor_gpus"] == 1.0 and run["images"] == 64 and not run["errors"]
    # TF32 convolutions may flip a near-tie between the two device batches' programs.
    assert agreement(tmp_path / "out_loop", tmp_path / "out_pipeline") >= 0.95


def test_node_script_keeps_each_report(tmp_path):
    """tools/gpu_check_node.sh, as a node without the package installed runs it (the checkout
    on PYTHONPATH), with `batch-infer gpu-check --quick` on a machine without a GPU: each
    model's report as text and JSON and nothing else in OUT_DIR, the JAX version recorded,
    the report's contents; an unknown model name is refused before any check runs."""
    from driver import private_ray_env, stop_private_ray

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu_check_node.sh"
    ray_tmp = tempfile.mkdtemp(prefix="bi-node-", dir="/tmp")  # short: socket paths
    env = private_ray_env(ray_tmp, {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MODELS": "digits", "GPU_CHECK_ARGS": "--quick --photos 24"})
    try:
        proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_private_ray(ray_tmp)
    out = tmp_path / "out"
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["digits.json", "digits.txt", "node.txt"]
    assert "jax " in (out / "node.txt").read_text()
    # The CPU-safe part of gpu-check: every section on the CPU, labelled so, the GPU tests run
    # (and skipped), the Predictor's answers the bare model's, every photo a row.
    result = json.loads((out / "digits.json").read_text())
    printed = (out / "digits.txt").read_text()
    assert EXPECTED_KEYS <= set(result) and result["gpu"] is False and result["ok"]
    assert "no GPU" in result["notes"][0] and "no GPU" in printed and "RESULT: ok" in printed
    assert result["devices"]["platform"] == "cpu"
    tests = result["pytest"]
    assert tests["exit"] == 0 and tests["failed"] == 0 and tests["skipped"] >= 1
    assert any(f.endswith("test_fusion.py") for f in tests["files"])
    assert result["seed"]["device"].startswith("cpu")
    assert result["predictor"]["same_answers"] and result["predictor"]["where"] == "in process"
    assert [r["device_batch"] for r in result["sweep"]["rows"]] == [32, 64]
    assert 0 <= result["precision"]["agreement"] <= 1
    run = result["pipeline_run"]
    assert run["images"] == 24 and run["errors"] == 0 and run["fraction_of_limit"] > 0
    assert f"first result at {run['first_result_seconds']:.1f} s of {run['seconds']:.1f}" in printed
    assert result["limits"]["limit_images_per_second"] > run["images_per_second"]

    refused = subprocess.run(["bash", str(script), str(tmp_path / "other")],
                             env={**env, "MODELS": "digits vgg"}, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "unknown model 'vgg'" in refused.stderr
    assert not (tmp_path / "other" / "digits.txt").exists()
