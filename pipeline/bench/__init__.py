"""``batch-infer bench``: how fast, against what, and against what this machine can do at best.

In one run, on the same model (``--model-fn``/``--model``, default the bundled digits CNN) and
the same images (``--workload digits|photos``, ``--image-size``):

* **seed table** (:mod:`.seed`): the bundled CNN op by op, one image at a time, vs batched
  and compiled, per stage;
* **model cost** (:mod:`.model_cost`): the compiled model alone at the plan's device batch;
  optionally per device batch (``--sweep``), and bfloat16 vs float32;
* **model stage** (:mod:`.model_stage`): the bare model vs the pipeline's ``Predictor`` in a
  Ray actor, same blocks, same labels;
* **limit** (:mod:`.limits`): decode cost per core and model cost, measured apart, give the
  most images/s this machine can do; the pipeline's fraction of it;
* **end to end** (:mod:`.end_to_end`, :mod:`.contestants`): a plain loop, Ray Data's
  documented recipe and ``pipeline.run``, each in its own process, interleaved, medians;
  Ray start-up timed apart; whether their labels agree;
* **memory** (optional): the pipeline's peak memory on N times the images.

Where JAX sees a GPU, everything computes on it, and the bench's own process never starts
CUDA (:mod:`.gpu`): the measurements that need the GPU run in child processes.
The machines this runs on are shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.bench.contestants import CONTESTANTS, contestant
from pipeline.bench.report import format_report
from pipeline.bench.workload import Setup

__all__ = ["CONTESTANTS", "Setup", "bench", "contestant", "format_report", "prepare", "section"]

SAMPLE = 256  # distinct files decoded for the decode cost and the model's inputs
COST_IMAGES = 2048  # model-cost images when --model-images is 0


def bench(*, images: int = 20_000, repeats: int = 3, seed_images: int = 256,
          work: str | None = None, end_to_end_run: bool = True, model_images: int = 16384,
          memory_factor: int = 0, model_fn: str | None = None, model: str | None = None,
          workload: str = "digits", image_size: tuple[int, int] | None = None,
          sweep: tuple[int, ...] = (), precision: bool = True) -> dict[str, Any]:
    """Run every part (see the module docstring); returns the JSON result."""
    from pipeline.bench.end_to_end import end_to_end, memory_scaling
    from pipeline.bench.limits import fraction, limits
    from pipeline.bench.workload import cores

    root = Path(work or tempfile.mkdtemp(prefix="batch-infer-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    setup, result = prepare(root, model_fn=model_fn, model=model, workload=workload,
                            image_size=image_size, images=images if end_to_end_run else SAMPLE,
                            repeats=repeats)
    inputs = result.pop("_inputs")
    result.update(section(setup, "pipeline.bench.model_cost:device_section", setup=setup.to_json(),
                          inputs=inputs, count=model_images or COST_IMAGES, repeats=repeats,
                          seed_images=seed_images, sweep_sizes=list(sweep),
                          with_precision=precision))
    if model_images:
        # Two processes on one GPU (the bare model's and the actor): no 75% grab by either.
        result["model_stage"] = section(
            setup, "pipeline.bench.model_stage:model_stage_section",
            env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, setup=setup.to_json(),
            inputs=inputs, count=model_images, repeats=repeats)
    plan = result["plan"]
    result["limits"] = limits(
        cores=cores(), decode_ms=result["decode"]["ms_per_image"],
        model_ms=result["model_cost"]["ms_per_image"], gpus=setup.gpus,
        decode_cores=cores() - plan["actors"] * plan["actor_cpus"] if setup.gpus else None)
    if end_to_end_run:
        e2e = end_to_end(setup, images, repeats, root)
        e2e["fraction_of_limit"] = {name: fraction(m["images_per_second"], result["limits"])
                                    for name, m in e2e["median"].items()}
        result["end_to_end"] = e2e
    if memory_factor:
        result["memory_scaling"] = memory_scaling(setup, images, memory_factor, root)
    return result


def prepare(root: Path, *, model_fn: str | None, model: str | None, workload: str,
            image_size: tuple[int, int] | None, images: int, repeats: int) -> tuple[Setup, dict]:
    """Find the devices (without starting CUDA here), load and check the model, plan the
    device batch, write the workload's images and decode a sample of them (decode cost);
    returns the setup and the result's first entries (``_inputs``: the decoded sample's .npy)."""
    from pipeline.bench.gpu import probe
    from pipeline.bench.model_cost import save_inputs
    from pipeline.bench.workload import decode_sample, image_paths, make_images, plan_for
    from pipeline.platforms import pin_to_cpu

    pin_to_cpu()  # this process only traces, lowers and decodes; GPUs are for the children
    devices = probe()
    gpus = devices["count"] if devices["gpu"] else 0
    setup = Setup(model_fn=model_fn, model=model, workload=workload, image_size=image_size,
                  gpus=gpus, platform="gpu" if gpus else "cpu")
    loaded = setup.load_model()
    plan = plan_for(setup, loaded, images)
    setup = dataclasses.replace(setup, device_batch=plan.device_batch_size)
    directory = make_images(setup, root, images)
    paths = image_paths(directory)[:SAMPLE]
    sample, decode_ms = decode_sample(paths, loaded.spec, repeats)
    notes = [] if gpus else [f"no GPU: JAX sees {devices['platform'] or 'nothing'}"
                             f"{' (' + devices['error'] + ')' if devices['error'] else ''}; "
                             "everything ran on the CPU"]
    return setup, {
        "devices": devices, "notes": notes, "setup": dataclasses.asdict(setup),
        "model": {"name": loaded.name, "factory": loaded.factory,
                  "input": "x".join(map(str, loaded.spec.shape)),
                  "output": loaded.spec.output, "classes": loaded.spec.output_dim},
        "plan": plan.to_json(),
        "decode": {"ms_per_image": decode_ms, "files": len(paths), "process": "one, one core"},
        "_inputs": save_inputs(sample, root),
    }


def section(setup: Setup, target: str, /, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """``target(**kwargs)`` here on a CPU machine; in a child process when JAX computes on a
    GPU (see :mod:`pipeline.bench.gpu`)."""
    if setup.on_gpu:
        from pipeline.bench.gpu import in_child

        # One GPU, as each of the pipeline's actors has (Ray sets CUDA_VISIBLE_DEVICES for
        # it): the costs are per GPU, and a Predictor would otherwise shard over them all.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or "0"
        env = {"CUDA_VISIBLE_DEVICES": visible.split(",")[0], **(env or {})}
        return in_child(target, env=env, **kwargs)
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)
