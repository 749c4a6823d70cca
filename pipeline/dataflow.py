"""The Ray Data graph of a run: read+decode tasks -> inference actors (which write) -> driver.

Every size and resource comes from the :class:`pipeline.plan.Plan`. Each decode task reads
its own slice of the listing file, skips the inputs already committed (the ``path`` column
of the parts whose range meets its slice) and yields decoded blocks as it goes. The actors
predict a block, write it as part files and return one small record per part, which is all
the driver ever receives.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import RunConfig
from pipeline.crash_guard import DecodeGuard
from pipeline.infer import Predictor
from pipeline.listing import ListingFile
from pipeline.machine import this_node
from pipeline.plan import Plan, PlanError
from pipeline.read import storage_env
from pipeline.source import Source
from pipeline.visible import Witnesses
from pipeline.write import OutputDir, part_range

log = logging.getLogger(__name__)


def execute(
    cfg: RunConfig, plan: Plan, listing: ListingFile, committed: list[str], spec,
    source: Source, fingerprint: str, run_id: str, weights: str = "",
    witnesses: Witnesses | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches of part records (see :class:`pipeline.write.PartWriter`) as parts are
    committed, in whatever order they finish."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI's status line says how far the run is
    # Ray Data merges the blocks a task yields until they pass target_max_block_size (128 MB
    # by default): a decode task's 4 blocks became 1, which a single actor then took whole
    # (seen in Ray Data's stats: 2 actor calls for 1,600 images). A target just under one
    # decoded block keeps each block a block of its own: it goes downstream as soon as it is
    # decoded, and the actors share them.
    block_bytes = plan.rows_per_block * int(np.prod(spec.shape))
    saved, ctx.target_max_block_size = ctx.target_max_block_size, block_bytes
    env = _task_env()
    slices = _slices(listing.count, plan.units_per_task, committed)
    decode: dict[str, Any] = {"num_cpus": plan.decode_cpus}
    if plan.decode_memory:
        decode["memory"] = plan.decode_memory
    if env:
        decode["runtime_env"] = env
    units = _Slices(listing, slices, cfg.output, source, spec, cfg.max_pixels,
                    plan.rows_per_block, run_id, cfg.decode_timeout, witnesses)
    ds = ray.data.read_datasource(units, override_num_blocks=len(slices), **decode)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_path": cfg.model, "model_fn": cfg.model_fn,
            "batch_size": cfg.batch_size, "top_k": cfg.top_k, "logits": cfg.logits,
            "compute_dtype": cfg.compute_dtype, "platform": plan.platform,
            "run_id": run_id, "fingerprint": fingerprint, "weights": weights,
            "device_batch_size": plan.device_batch_size,
            "output": cfg.output, "rows_per_file": cfg.rows_per_file,
            "infer_timeout": cfg.infer_timeout, "witnesses": witnesses,
        },
        # A whole decoded block per call; the actor feeds it to the device a device batch at
        # a time. Ray Data's cost per call paid once per 32 rows was 60% of the actor's time.
        batch_size=plan.rows_per_block,
        batch_format="numpy",
        zero_copy_batch=True,
        # Every actor is asked for at once: work starts as they arrive (Ray Data would
        # otherwise grow the pool ~14% a step, one pending actor at a time). Two calls run
        # per actor, on two threads sharing one device: one computes, the other writes.
        # No block waits in an actor's queue beyond the two it runs: a queued block is one a
        # newly arrived actor (a node the autoscaler just added) cannot take.
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=plan.actors, initial_size=plan.actors,
            max_concurrent_calls_per_actor=plan.calls_per_actor,
            max_tasks_in_flight_per_actor=plan.calls_per_actor,
            enable_true_multi_threading=True,
        ),
        **_actor_resources(plan, env),
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        ctx.target_max_block_size = saved


def _slices(count: int, per_task: int, committed: list[str]) -> list[tuple[int, int, list]]:
    """(lo, hi, committed parts whose listing range meets [lo, hi)) per decode task."""
    ranges = sorted((r, name) for name in committed if (r := part_range(name)))
    out, first = [], 0
    for lo in range(0, count, per_task):
        hi = min(count, lo + per_task)
        while first < len(ranges) and ranges[first][0][1] <= lo:  # ends before this slice
            first += 1
        meets = []
        for (a, b), name in ranges[first:]:
            if a >= hi:
                break
            if b > lo:
                meets.append(name)
        out.append((lo, hi, meets))
    return out


class _Slices(Datasource):
    """The listing as a Ray Data source: one read task per slice, which decodes as it reads;
    described from the driver's own numbers, so planning costs no remote call."""

    def __init__(self, listing: ListingFile, slices, output: str, source: Source, spec,
                 max_pixels: int, rows: int, run_id: str, decode_timeout: float,
                 witnesses: Witnesses | None):
        self._listing, self._slices, self._output = listing, slices, output
        self._source, self._spec, self._max_pixels, self._rows = source, spec, max_pixels, rows
        self._run_id, self._decode_timeout = run_id, decode_timeout
        self._witnesses = witnesses

    def estimate_inmemory_data_size(self) -> int:
        return self._listing.count * int(np.prod(self._spec.shape))

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        image_bytes = int(np.prod(self._spec.shape))
        # Each task carries its own slice only (a closure over self would ship every slice
        # with every task: quadratic in the input's size).
        return [
            ReadTask(
                functools.partial(_decode_slice, self._listing, lo, hi, parts, self._output,
                                  self._source, self._spec, self._max_pixels, self._rows,
                                  f"{self._run_id}/decode/{lo}", self._decode_timeout,
                                  self._witnesses),
                BlockMetadata(num_rows=hi - lo, size_bytes=(hi - lo) * image_bytes,
                              input_files=None, exec_stats=None),
            )
            for lo, hi, parts in self._slices
        ]


def _decode_slice(listing: ListingFile, lo: int, hi: int, parts: list[str], output: str,
                  source: Source, spec, max_pixels: int, rows: int, guard_key: str,
                  decode_timeout: float, witnesses: Witnesses | None):
    # A generator: each decoded block goes downstream as soon as it is done, and a shard
    # becomes several blocks, never one huge one.
    try:
        table = listing.read(lo, hi)
    except FileNotFoundError:  # a node that does not see the output: say so, in one line
        if witnesses is not None:
            witnesses.check()
        raise
    done = OutputDir(output).paths_in(parts) if parts else frozenset()
    units = np.arange(lo, hi, dtype=np.int64)
    # A file that kills this process or hangs its decoder: see crash_guard.
    guard = DecodeGuard(guard_key, decode_timeout)
    try:
        for block in source.decode(table, units, done, spec, max_pixels, rows, guard,
                                   witnesses):
            yield BlockAccessor.batch_to_block(block)
        guard.finished()
    finally:
        guard.close()


def check_nodes_see(witnesses: Witnesses, cluster) -> None:
    """Before a run: raise :class:`pipeline.plan.PlanError` if a node that may work for it
    does not see its local input or output (see :mod:`pipeline.visible`). One task per node
    (a second or so, in parallel); nothing to do when every node is the driver's own, or
    nothing is local."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = this_node()
    nodes = [n for n in cluster.nodes if (n.cpus or n.gpus) and n.node_id != here]
    if not witnesses.local or not nodes:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_unseen)
    pending = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
                      runtime_env=_task_env()).remote(witnesses): n
        for n in nodes
    }
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_SECONDS)
    if late:  # a node too busy or too slow to answer: its tasks check for themselves
        log.warning("%d node(s) did not answer the shared-storage check in %g s: %s",
                    len(late), PROBE_SECONDS, ", ".join(pending[r].ip for r in late))
    problems = []
    for ref in ready:
        try:
            problem = ray.get(ref)
        except Exception as e:  # a node that cannot run our code: its own tasks will say so
            log.warning("Could not check node %s for shared storage: %s", pending[ref].ip, e)
            continue
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} other node(s))" if len(problems) > 1 else ""
        raise PlanError(problems[0] + more)


# How long the driver waits for every node's shared-storage check (a worker process start).
PROBE_SECONDS = 60.0


def _unseen(witnesses: Witnesses) -> str | None:
    return witnesses.unseen()


def _task_env() -> dict[str, Any] | None:
    # Decode tasks read the inputs and actors write the output: give them the driver's
    # object-store settings (endpoint, region, keys), which nodes started elsewhere do not
    # have. Nothing set, nothing passed: tasks with their own runtime_env need worker
    # processes of their own.
    env = storage_env()
    return {"env_vars": env} if env else None


def _actor_resources(plan: Plan, env: dict[str, Any] | None) -> dict[str, Any]:
    resources: dict[str, Any] = {"num_cpus": plan.actor_cpus}
    env_vars = dict((env or {}).get("env_vars", {}))
    if plan.actor_gpus > 0:
        resources["num_gpus"] = plan.actor_gpus
        if plan.actor_gpus < 1:  # several actors share a GPU: no 75% grab per process
            env_vars["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    # (No num_gpus at all on CPU: some Ray versions treat num_gpus=0 as a GPU request. The
    # actor pins JAX to its platform itself, see pipeline.platforms.configure.)
    if env_vars:
        resources["runtime_env"] = {"env_vars": env_vars}
    return resources


def session_dir() -> str | None:
    """This process's Ray session directory (where Ray keeps its logs), if it has one."""
    try:
        return ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:  # a client connection, or a Ray without the attribute
        return None


def ensure_ray(address: str | None, quiet: bool = False) -> None:
    """Join ``address`` (or RAY_ADDRESS), or start a local Ray, unless Ray is up already.
    ``quiet``: workers' output stays in their log files instead of this process's terminal."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": not quiet}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)
    else:
        # A Ray we start for one local run serves only this machine: keep it on loopback.
        # address="local": without it, ray.init() joins any `ray start` head on this machine.
        # No dashboard: it cost 1-2.5 s of each run's start-up on 2 cores (ray.init 2.9-3.8 s
        # without it, 4.7-5.6 s with). To watch a run there, start Ray yourself and join it.
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 **options)

