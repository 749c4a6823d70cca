"""The Ray Data graph of a run: read+decode tasks -> inference actor pool -> the driver.

Sizes and resources are chosen here, each measured on a 2-core CPU machine with 20,000
128x96 JPEGs and the bundled digits CNN (``batch-infer bench``); the reasons sit beside them.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import RunConfig
from pipeline.crash_guard import forget_run
from pipeline.infer import Predictor
from pipeline.read import storage_env
from pipeline.shards import Source

# Rows per decoded block, the unit the actors take: up to 1024 rows, and up to 64 MB of
# decoded pixels (416 rows of 224x224 RGB). Ray Data costs a few ms per block at each stage
# (actor call, format conversion, the driver's read); 1024-row blocks of small images took
# 10% less time end to end than 512-row ones.
MAX_ROWS_PER_BLOCK = 1024
BLOCK_BYTES = 64 * 2**20
# Decoded blocks per decode task. Each task costs Ray Data a scheduling round and a worker
# lease, ~0.1-0.4 s on a busy 2-core machine, during which that decoder idles: with one
# 512-row block per task the two decoders were busy 0.85 of the time, with four 1.2, and
# the run took 15% less time. The task still yields each block as soon as it is decoded.
BLOCKS_PER_TASK = 4
# Half a CPU per decode task: on CPU the inference actor holds one CPU but is mostly idle
# (its model is ~4x cheaper than a decode), so two decoders per spare core keep every core
# busy. The differing request also keeps Ray Data from fusing decode into the actor, which
# would serialise decode behind inference in one process per node.
DECODE_CPUS = 0.5


def execute(
    cfg: RunConfig, units: list[str], spec, source: Source, done: AbstractSet[str],
    fingerprint: str,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield result batches (numpy dicts) for ``units`` (files or shards; rows in ``done`` are
    skipped inside shards), in whatever order they finish."""
    ensure_ray(cfg.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    actors = _actor_count(cfg)
    # The default count is what the cluster holds now (its GPUs, or its nodes): start them all,
    # since Ray Data grows a pool only once its running actors are busy, too late for a short
    # run. An explicit --actors is a ceiling to grow to, e.g. on a cluster that autoscales.
    min_actors = actors if cfg.actors is None else 1
    rows = rows_per_block(len(units), actors, cfg.batch_size, int(np.prod(spec.shape)))
    per_task = units_per_task(len(units), rows, _decode_slots(actors, cfg))
    run_id = uuid.uuid4().hex  # names what the actors' crash guards record in the GCS
    resources = _decode_resources()
    # Reading the listing is part of each decode task (Ray Data fuses the two): no driver
    # round trip to describe the blocks, no hop through the object store.
    tables = source.blocks(units, done, per_task)
    ds = ray.data.read_datasource(_Units(tables), override_num_blocks=len(tables), **resources)
    ds = ds.map_batches(
        _decode_task,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"source": source, "spec": spec, "max_pixels": cfg.max_pixels, "rows": rows},
        **resources,
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_path": cfg.model, "model_fn": cfg.model_fn,
            "batch_size": cfg.batch_size, "top_k": cfg.top_k, "logits": cfg.logits,
            "compute_dtype": cfg.compute_dtype, "platform": cfg.actor_platform,
            "run_id": run_id, "fingerprint": fingerprint,
            "device_batch_size": cfg.device_batch_size,
        },
        # A whole decoded block per call; the actor feeds it to the device batch_size rows at
        # a time. Ray Data's cost per call paid once per 32 rows was 60% of the actor's time.
        batch_size=rows,
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=actors),
        **_actor_resources(cfg),
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        forget_run(run_id)


class _Units(Datasource):
    """The listing as a Ray Data source: one read task per table of units (paths or shards),
    described from the driver's own copy, so planning costs no remote call."""

    def __init__(self, tables: list[Any]):
        self._tables = tables

    def estimate_inmemory_data_size(self) -> int:
        return sum(t.nbytes for t in self._tables)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [
            ReadTask(
                lambda t=t: [t],
                BlockMetadata(num_rows=t.num_rows, size_bytes=t.nbytes, input_files=None,
                              exec_stats=None),
                schema=t.schema,
            )
            for t in self._tables
        ]


def _decode_task(batch: dict[str, np.ndarray], source: Source, spec, max_pixels: int, rows: int):
    # A generator: each decoded block goes downstream as soon as it is done, and a shard
    # becomes several blocks, never one huge one.
    yield from source.decode(batch, spec, max_pixels, rows)


def rows_per_block(n: int, actors: int, batch_size: int, image_bytes: int) -> int:
    """Rows per decoded block: a whole number of model batches, at most MAX_ROWS_PER_BLOCK
    rows and BLOCK_BYTES of images (but one batch at least), and small enough that a small
    input still makes two blocks per actor: a block goes to one actor, so 200 images in one
    block would keep every GPU but one idle."""
    cap = min(MAX_ROWS_PER_BLOCK, BLOCK_BYTES // image_bytes) // batch_size * batch_size
    per_actor = -(-n // (2 * actors))
    return max(batch_size, min(cap, batch_size * -(-per_actor // batch_size)))


def units_per_task(n: int, rows: int, slots: int) -> int:
    """Units (files) per decode task: up to BLOCKS_PER_TASK blocks, but at least two tasks per
    decode slot, so that a large cluster still decodes on every CPU."""
    per_slot = -(-n // (2 * slots))
    return rows * max(1, min(BLOCKS_PER_TASK, per_slot // rows))


def _decode_slots(actors: int, cfg: RunConfig) -> int:
    """How many decode tasks the cluster runs at once beside the actors."""
    cpus = ray.cluster_resources().get("CPU", 1)
    actor_cpus = 0 if cfg.gpus_per_actor > 0 else actors
    return max(1, int((cpus - actor_cpus) / DECODE_CPUS))


def _decode_resources() -> dict[str, Any]:
    # Decode tasks read the inputs: give them the driver's object-store settings (endpoint,
    # region, keys), which nodes started elsewhere do not have. Nothing set, nothing passed:
    # tasks with their own runtime_env need worker processes of their own.
    env = storage_env()
    resources: dict[str, Any] = {"num_cpus": DECODE_CPUS}
    if env:
        resources["runtime_env"] = {"env_vars": env}
    return resources


def ensure_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # A Ray we start for one local run serves only this machine: keep it on loopback.
        # address="local": without it, ray.init() joins any `ray start` head on this machine.
        ray.init(address="local", _node_ip_address="127.0.0.1", logging_level=logging.WARNING)


def _actor_count(cfg: RunConfig) -> int:
    if cfg.actors:
        return cfg.actors
    if cfg.gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0)
        return max(1, int(gpus / cfg.gpus_per_actor))
    # XLA:CPU already uses every core of its machine; two CPU actors on one node only fight.
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def _actor_resources(cfg: RunConfig) -> dict[str, Any]:
    if cfg.gpus_per_actor > 0:
        env = {}
        if cfg.gpus_per_actor < 1:  # several actors share a GPU: no 75% grab per process
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        return {"num_gpus": cfg.gpus_per_actor, "runtime_env": {"env_vars": env}}
    # Pass no num_gpus at all on CPU: some Ray versions treat num_gpus=0 as a GPU request.
    # The actor pins JAX to the CPU itself (Predictor's platform argument).
    return {"num_cpus": 1}
