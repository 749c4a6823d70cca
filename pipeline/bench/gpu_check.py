"""``batch-infer gpu-check``: one command to check a GPU node end to end.

1. the devices JAX sees (asked in a child process: this one never starts CUDA), and the
   cards as ``nvidia-smi`` names them;
2. ``python -m pytest -m gpu -q`` on the test files that hold GPU tests (cuDNN fusion, the
   bench on the GPU): passed, failed, skipped;
3. the seed table, the model's cost, bfloat16 vs float32, a device-batch sweep and the
   pipeline's ``Predictor`` vs the bare model (in one child process holding the GPU; the
   Predictor also in a Ray actor, unless ``--quick``);
4. ``pipeline.run`` on a few thousand photo-like JPEGs (Ray start-up timed apart) against
   the bare model's rate and the machine's limit (:mod:`pipeline.bench.limits`).

It needs what a GPU node has (JAX with CUDA, numpy, pyarrow, Pillow, scikit-learn, pytest,
Ray) and no network. On a machine without a GPU the same runs on the CPU, labelled "no GPU";
``--quick`` shrinks every size so that takes about a minute on a laptop.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.bench import prepare, section
from pipeline.bench.gpu import spawning
from pipeline.bench.limits import fraction, limits
from pipeline.bench.report import format_report

QUICK = {"photos": 64, "seed_images": 32, "model_images": 256, "sweep": [32, 64], "repeats": 1}
FULL = {"photos": 4000, "seed_images": 256, "model_images": 8192,
        "sweep": [32, 64, 128, 256, 512], "repeats": 3}
PYTEST_TIMEOUT = 1800
PYTEST_COUNTS = ("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed")


def gpu_check(*, quick: bool = False, work: str | None = None, model_fn: str | None = None,
              model: str | None = None, photos: int | None = None,
              run_tests: bool = True) -> dict[str, Any]:
    """Run the checks (see the module docstring); returns the JSON result, with ``ok`` False
    when a check failed (and ``failures`` saying which)."""
    from pipeline.bench.gpu import nvidia_smi
    from pipeline.bench.workload import cores, make_images

    sizes = dict(QUICK if quick else FULL)
    if photos:
        sizes["photos"] = photos
    root = Path(work or tempfile.mkdtemp(prefix="batch-infer-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    setup, result = prepare(root, model_fn=model_fn, model=model, workload="photos",
                            image_size=None, images=sizes["photos"], repeats=sizes["repeats"])
    inputs = result.pop("_inputs")
    result = {"gpu": result["devices"]["gpu"], "quick": quick, "sizes": sizes,
              "nvidia_smi": nvidia_smi(), **result}
    result["pytest"] = (gpu_tests() if run_tests
                        else {"ran": False, "reason": "left out (--skip-tests)"})
    result.update(section(setup, "pipeline.bench.model_cost:device_section",
                          setup=setup.to_json(), inputs=inputs, count=sizes["model_images"],
                          repeats=sizes["repeats"], seed_images=sizes["seed_images"],
                          sweep_sizes=sizes["sweep"], with_precision=True, predictor=True))
    if not quick:
        result["model_stage"] = section(
            setup, "pipeline.bench.model_stage:model_stage_section",
            env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, setup=setup.to_json(),
            inputs=inputs, count=sizes["model_images"], repeats=sizes["repeats"])
    plan = result["plan"]
    result["limits"] = limits(
        cores=cores(), decode_ms=result["decode"]["ms_per_image"],
        model_ms=result["model_cost"]["ms_per_image"], gpus=setup.gpus,
        decode_cores=cores() - plan["actors"] * plan["actor_cpus"] if setup.gpus else None)
    images = make_images(setup, root, sizes["photos"])
    result["pipeline_run"] = pipeline_run(setup, images, root, result)
    result["failures"] = failures(result)
    result["ok"] = not result["failures"]
    return result


def pipeline_run(setup, images: Path, root: Path, result: dict) -> dict:
    """``pipeline.run`` in this process (it keeps its driver off the GPU), Ray started apart
    unless this process already has one; against the bare model and the limit."""
    from pipeline.bench.contestants import contestant

    run = contestant("pipeline", str(images), str(root / "out_pipeline"), setup)
    per_second = run["images"] / run["seconds"]
    bare = result["model_cost"]["images_per_second"] * max(1, setup.gpus)
    return {**run, "images_per_second": per_second, "bare_model_images_per_second": bare,
            "ratio_vs_bare_model": per_second / bare,
            "fraction_of_limit": fraction(per_second, result["limits"])}


def gpu_tests(timeout: float = PYTEST_TIMEOUT) -> dict[str, Any]:
    """``python -m pytest -m gpu -q`` on the repository's test files that hold GPU tests."""
    import pipeline

    tests = Path(pipeline.__file__).resolve().parents[1] / "tests"
    files = sorted(str(f) for f in tests.glob("test_*.py") if "mark.gpu" in f.read_text())
    if not files:
        return {"ran": False, "reason": f"no GPU tests under {tests} (installed without tests?)"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    try:
        with spawning():
            proc = subprocess.run(cmd, cwd=tests.parent, capture_output=True, text=True,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": True, "command": " ".join(cmd), "files": files, "exit": None,
                "reason": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    counted = re.compile(r"\d+ (passed|failed|skipped|error)")
    summary = next((line for line in reversed(lines) if counted.search(line)), "")
    counts = {k: 0 for k in PYTEST_COUNTS}
    for number, word in re.findall(r"(\d+) (\w+)", summary):
        key = "errors" if word in ("error", "errors") else word
        if key in counts:
            counts[key] = int(number)
    return {"ran": True, "command": " ".join(cmd), "files": files, "exit": proc.returncode,
            **counts,
            "summary": summary.strip("= "), "tail": lines[-15:] + proc.stderr.splitlines()[-5:]}


def _first_result(run: dict) -> str:
    """When the run's first result came: on a GPU node the start (the actor's CUDA start and
    compile) was 4-7 s of 4,000 photos' 4-5.5 s (an H200), so the rate says little there."""
    first = run.get("first_result_seconds")
    if first is None:
        return ""
    hint = (": start-up is much of this run, --photos N makes a longer one"
            if first >= 0.25 * run["seconds"] else "")
    return f"; first result at {first:.1f} s of {run['seconds']:.1f}{hint}"


def failures(result: dict) -> list[str]:
    """What went wrong, in words (an empty list: every check passed)."""
    out = []
    tests = result["pytest"]
    if tests.get("ran") and (tests.get("exit") != 0 or tests.get("failed") or tests.get("errors")):
        out.append(f"GPU tests: {tests.get('summary') or tests.get('reason')}")
    for key in ("predictor", "model_stage"):
        if key in result and not result[key]["same_answers"]:
            out.append(f"{key}: the Predictor's answers differ from the bare model's")
    run = result["pipeline_run"]
    expected = result["sizes"]["photos"]
    if run["images"] != expected or run.get("errors"):
        out.append(f"pipeline run: {run['images']} rows for {expected} photos, "
                   f"{run.get('errors', 0)} error rows")
    return out


def format_check(result: dict) -> str:
    """The report gpu-check prints."""
    d = result["devices"]
    if result["gpu"]:
        lines = [f"Devices — {d['count']} x {', '.join(d['kinds'])} (JAX {d['jax']}, "
                 f"backend {d['backend']})"]
    else:
        lines = [f"Devices — no GPU: JAX sees {d['count']} x {d['platform'] or 'nothing'}"
                 + (f" ({d['error']})" if d["error"] else "")
                 + "; every check below ran on the CPU"]
    for card in result.get("nvidia_smi") or []:
        lines.append("  nvidia-smi: " + ", ".join(f"{k} {v}" for k, v in card.items()))
    t = result["pytest"]
    if t.get("ran") and "passed" in t:
        lines.append(f"GPU tests — pytest -m gpu on {len(t['files'])} file(s): {t['passed']} "
                     f"passed, {t['failed']} failed, {t['skipped']} skipped, {t['errors']} errors "
                     f"(exit {t['exit']})")
    else:
        lines.append(f"GPU tests — not run: {t['reason']}")
    run = result["pipeline_run"]
    tail = [f"Pipeline run — {run['images']} photos: {run['images_per_second']:,.0f} images/s "
            f"(Ray start-up apart: init {run['init_seconds']:.1f} s, data actors "
            f"{run['data_start_seconds']:.1f} s) = {run['ratio_vs_bare_model']:.3f}x the bare "
            f"model's {run['bare_model_images_per_second']:,.0f} images/s, "
            f"{run['fraction_of_limit']:.0%} of the limit; {run.get('errors', 0)} error rows"
            + _first_result(run),
            "RESULT: " + ("ok" if result["ok"] else "FAILED: " + "; ".join(result["failures"]))
            + ("" if result["gpu"] else " (no GPU: the CPU-safe part only)")]
    return "\n\n".join(["\n".join(lines), format_report(result), "\n".join(tail)])
