"""The three ways to run the same model on the same files, each as a user would write it.

* ``loop``: one process, Pillow decode (the pipeline's ``decode_image``) then the compiled
  model in device batches, on JAX's default device (a GPU where there is one).
* ``ray_recipe``: Ray Data's documented image batch-inference recipe, with our model dropped
  in: ``read_images(size=..., mode=...)`` -> ``map_batches(callable class, ActorPoolStrategy,
  num_gpus=1 on a GPU node)`` -> ``write_parquet``.
* ``pipeline``: ``pipeline.run`` (``gpus_per_actor=1`` on a GPU node), its plan deciding the rest.

Each writes one Parquet row per image with ``path`` and its answer (``label``, the top-1, or
``embedding``; see :mod:`pipeline.bench.answers`), so that the bench can check they computed
the same thing. Ray start-up (``ray.init``, then Ray Data's
per-cluster actors) is timed apart, see :func:`start_ray`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import answers
from pipeline.bench.workload import Setup, image_paths

CONTESTANTS = ("loop", "ray_recipe", "pipeline")


def contestant(name: str, images: str, output: str, setup: Setup) -> dict:
    """Run one contestant in this process; returns its timings. Starts (and stops) a local
    Ray for the Ray contestants unless this process already has one."""
    if name not in CONTESTANTS:
        raise ValueError(f"unknown contestant {name!r}; one of {', '.join(CONTESTANTS)}")
    if name == "loop":
        return _loop(images, output, setup)
    import ray

    from pipeline.platforms import pin_to_cpu

    pin_to_cpu()  # the driver: its JAX (a factory's arrays) must not take the actors' GPU
    owns = not ray.is_initialized()
    init, data_start = start_ray() if owns else (0.0, 0.0)
    try:
        start = time.perf_counter()
        if name == "ray_recipe":
            result = {"images": _ray_recipe(images, output, setup)}
        else:
            result = _pipeline(images, output, setup)
        result.update(seconds=time.perf_counter() - start, init_seconds=init,
                      data_start_seconds=data_start)
    finally:
        if owns:
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
    import logging

    import ray

    from pipeline.bench.gpu import spawning

    start = time.perf_counter()
    with spawning():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # else two lines per dataset
    init = time.perf_counter() - start
    start = time.perf_counter()
    pool = ray.data.ActorPoolStrategy(size=1)
    ray.data.range(1).map_batches(_Noop, compute=pool, num_cpus=0.01).materialize()
    return init, time.perf_counter() - start


def _loop(images: str, output: str, setup: Setup) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.decode import decode_image
    from pipeline.device import Executor
    from pipeline.platforms import configure

    start = time.perf_counter()
    configure(setup.platform)
    model = setup.load_model()
    executor = Executor(model.program(top_k=1), model.params, model.spec.shape,
                        setup.batch_size, setup.device_batch)
    paths = image_paths(Path(images))
    found = []
    step = setup.device_batch
    for i in range(0, len(paths), step):
        chunk = paths[i : i + step]
        batch = np.stack([decode_image(Path(p).read_bytes(), model.spec) for p in chunk])
        found.append(answers.of(executor.run(batch)))  # (B, H, W, C) -> (B,) or (B, D)
    os.makedirs(output, exist_ok=True)
    pq.write_table(pa.table({"path": paths, answers.column(model.spec): _column(found)}),
                   f"{output}/loop.parquet")
    return {"images": len(paths), "seconds": time.perf_counter() - start, "init_seconds": 0.0,
            "data_start_seconds": 0.0, "device": executor.describe()}


def _column(found: list[np.ndarray]) -> Any:
    """Answers of all batches as one Arrow column: int32 labels or fixed-size float lists."""
    import pyarrow as pa

    if not found:
        return pa.array([], pa.int32())
    values = np.concatenate(found)
    if values.ndim == 1:
        return pa.array(values.astype(np.int32))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _ray_recipe(images: str, output: str, setup: Setup) -> int:
    """Ray Data's documented image batch-inference recipe, with our model dropped in."""
    import pyarrow.parquet as pq
    import ray

    spec = setup.load_model().spec
    name = answers.column(spec)

    class Classifier:
        def __init__(self):
            import jax

            if setup.platform == "cpu":  # only for a test that asks Ray for GPUs it lacks
                jax.config.update("jax_platforms", "cpu")
            self.model = setup.load_model()
            self.params = jax.device_put(self.model.params)  # once, as any user would
            self.forward = jax.jit(self.model.forward)

        def __call__(self, batch):
            x = batch["image"].reshape(-1, *spec.shape)  # (B, H, W, C) uint8
            out = np.asarray(self.forward(self.params, x))  # (B, D) probabilities or vectors
            answer = out.argmax(axis=1).astype(np.int32) if name == "label" else out
            return {"path": batch["path"], name: answer}

    mode = "L" if spec.channels == 1 else "RGB"
    ds = ray.data.read_images(images, size=(spec.height, spec.width), mode=mode,
                              include_paths=True)
    gpus = {"num_gpus": 1} if setup.gpus else {}  # nothing at all on CPU (see RESEARCH.md)
    ds = ds.map_batches(Classifier, compute=ray.data.ActorPoolStrategy(size=max(1, setup.gpus)),
                        batch_size=setup.device_batch, **gpus)
    ds.write_parquet(output)
    return pq.read_table(output, columns=["path"]).num_rows


def _pipeline(images: str, output: str, setup: Setup) -> dict:
    import pipeline

    options = {}
    if setup.gpus:
        options = {"gpus_per_actor": 1.0, "platform": setup.platform}
    summary = pipeline.run(images, output, overwrite=True, progress=False,
                           model=setup.model, model_fn=setup.model_fn,
                           batch_size=setup.batch_size, **options)
    return {"images": summary.rows_ok + summary.rows_error, "errors": summary.rows_error,
            "first_result_seconds": summary.first_result_seconds,
            "stage_ms_per_image": summary.stage_ms_per_image, "plan": summary.plan}
