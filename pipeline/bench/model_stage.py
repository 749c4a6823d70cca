"""The model stage: the pipeline's :class:`~pipeline.infer.Predictor` against the bare model.

Both get the same decoded blocks (``rows`` per call, the pipeline's block size) and the same
device batch; the bare model is an :class:`~pipeline.device.Executor` called in this process.
:func:`model_stage` runs the Predictor in a Ray actor, fed through the object store (its
result columns, the crash guard and Ray's calls included; ``num_gpus=1`` on a GPU node);
:func:`predictor_in_process` calls it here, without Ray (what ``gpu-check`` runs where Ray
is missing, and a measure of the Predictor's own cost). Their top-1 labels must agree.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from pipeline.bench import answers
from pipeline.bench.workload import Setup

TOP_K = 5  # the pipeline's default --top-k: the actor computes what a run computes


def blocks_of(images: np.ndarray, rows: int) -> list[dict[str, np.ndarray]]:
    """What decode tasks hand the actors: the columns of ``decode.decode_rows``."""
    out = []
    for first in range(0, len(images), rows):
        part = images[first : first + rows]
        n = len(part)
        out.append({"image": part, "error": np.full(n, "", object), "_t_decode": np.zeros(n),
                    "path": np.array([f"image-{first + i}" for i in range(n)], object)})
    return out


def default_rows(setup: Setup, images: np.ndarray) -> int:
    from pipeline.plan import rows_per_block

    return rows_per_block(len(images), 1, setup.device_batch, int(np.prod(images.shape[1:])))


def _bare(setup: Setup):
    from pipeline.device import Executor

    model = setup.load_model()
    return Executor(model.program(top_k=TOP_K), model.params, model.spec.shape,
                    setup.batch_size, setup.device_batch)


def _compare(bare, call, blocks: list[dict], repeats: int) -> dict:
    """Interleaved repeats of the bare executor and ``call`` (the first k blocks -> their
    result columns)."""
    n = sum(len(b["image"]) for b in blocks)
    bare.run(blocks[0]["image"])  # warm
    call(blocks[:1])
    rates: dict[str, list[float]] = {"bare": [], "predictor": []}
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        found = [answers.of(bare.run(b["image"])) for b in blocks]
        rates["bare"].append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        results = call(blocks)
        rates["predictor"].append(n / (time.perf_counter() - start))
    b, a = statistics.median(rates["bare"]), statistics.median(rates["predictor"])
    same = answers.agree(np.concatenate(found),
                         np.concatenate([answers.of(r) for r in results])).all()
    return {"images": n, "block_rows": len(blocks[0]["image"]), "device": bare.describe(),
            "device_batch": bare.device_batch, "bare_images_per_second": b,
            "predictor_images_per_second": a, "ratio": a / b, "same_answers": bool(same)}


def model_stage(setup: Setup, images: np.ndarray, repeats: int = 3,
                block: int | None = None) -> dict:
    """The bare model here vs the Predictor in a Ray actor. Uses this process's Ray if it has
    one, else starts a local one (and stops it)."""
    import ray

    from pipeline.bench.contestants import start_ray
    from pipeline.infer import Predictor
    from pipeline.platforms import configure

    configure(setup.platform)
    bare = _bare(setup)
    blocks = blocks_of(images, block or default_rows(setup, images))
    owns = not ray.is_initialized()
    if owns:
        start_ray()
    try:
        options = {"num_cpus": 1}
        if setup.gpus:
            # Two processes on one GPU (this one and the actor): neither may take 75% of it.
            options.update(num_gpus=1, runtime_env={
                "env_vars": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}})
        actor = ray.remote(**options)(Predictor).remote(
            setup.model, setup.model_fn, setup.batch_size, TOP_K, platform=setup.platform,
            device_batch_size=setup.device_batch, run_id=f"bench-{os.getpid()}")
        refs = [ray.put(b) for b in blocks]

        def call(first: list[dict]):
            return ray.get([actor.__call__.remote(ref) for ref in refs[: len(first)]])

        result = _compare(bare, call, blocks, repeats)
        result["where"] = "ray actor"
    finally:
        if owns:
            ray.shutdown()
    return result


def predictor_in_process(setup: Setup, images: np.ndarray, repeats: int = 3,
                         block: int | None = None) -> dict:
    """The bare model vs the Predictor, both in this process (no Ray, no crash guard)."""
    from pipeline.infer import Predictor

    bare = _bare(setup)
    predictor = Predictor(setup.model, setup.model_fn, setup.batch_size, TOP_K,
                          platform=setup.platform, device_batch_size=setup.device_batch)
    blocks = blocks_of(images, block or default_rows(setup, images))
    result = _compare(bare, lambda some: [predictor(b) for b in some], blocks, repeats)
    result["where"] = "in process"
    return result


def model_stage_section(setup: str, inputs: str, count: int, repeats: int) -> dict:
    """:func:`model_stage` with JSON-able arguments (for :func:`pipeline.bench.gpu.in_child`):
    ``setup`` as :meth:`Setup.to_json`, ``inputs`` a .npy of distinct decoded images, tiled
    to ``count``."""
    from pipeline.bench.workload import tiled

    return model_stage(Setup.from_json(setup), tiled(np.load(inputs), count), repeats)
