"""``pipeline.run``: list -> decode (Ray tasks) -> infer (Ray actor pool) -> write (driver).

Everything is checked before any image is read: the model loads and traces for its input
shape, the input lists to at least one image, the output directory is usable as asked.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.crash_guard import forget_run
from pipeline.infer import Predictor, result_columns
from pipeline.model import Model, ModelError, check_model, load_model
from pipeline.read import Listing, storage_env
from pipeline.shards import Source
from pipeline.write import MANIFEST, SUMMARY, OutputDir, OutputError, ResultWriter, output_schema

log = logging.getLogger(__name__)

# Rows per decode task. Large enough that Ray's per-task overhead (~1 ms) is small against
# 512 decodes (~0.3 ms each), small enough that the actors get work within a second and that
# a block of 224x224 RGB images (~75 MB) still fits comfortably in the object store.
ROWS_PER_BLOCK = 512
DECODE_CPUS = 0.5
STAGES = ("decode", "transfer_in", "compute", "transfer_out")


@dataclass
class Summary:
    """What a run did. ``rows_ok + rows_error`` covers every image input, resumed ones included."""

    output: str
    model: str
    rows_ok: int = 0
    rows_error: int = 0
    rows_resumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    first_result_seconds: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_ms_per_image: dict[str, float] = field(default_factory=dict)
    completed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(input: str, output: str, **options: Any) -> Summary:
    """Predict every image under ``input`` and write one Parquet row per image to ``output``.

    Options are the fields of :class:`pipeline.config.RunConfig`. Uses the caller's
    ``ray.init()`` if there is one, else ``address`` or a new local Ray.
    """
    return run_config(RunConfig(input=str(input), output=str(output), **options))


def run_config(cfg: RunConfig) -> Summary:
    start = time.perf_counter()
    model = load_model(cfg.model, cfg.model_fn)
    check_model(model, cfg.batch_size)
    if cfg.logits and model.spec.output != "classification":
        raise ModelError(
            f"{model.source} returns embeddings; --logits is for classification models (the "
            "embedding column already holds the raw values)."
        )
    source = Source.of(cfg)
    listing = source.list(cfg.input)
    out = OutputDir(cfg.output)
    done = prepare_output(out, cfg, listing, model)
    todo = source.todo(listing.paths, done)
    log.info(
        "%d %s to read (%d rows already done), model %s",
        len(todo), cfg.input_format, len(done), model.fingerprint,
    )
    writer = ResultWriter(out, output_schema(model.spec, cfg.logits), cfg.rows_per_file, set(done))
    summary = Summary(
        output=cfg.output, model=model.fingerprint, rows_resumed=len(done), skipped=listing.skipped
    )
    stage_totals = dict.fromkeys(STAGES, 0.0)
    if todo:
        for batch in _execute(cfg, todo, model.spec, source, done):
            if summary.first_result_seconds is None:
                summary.first_result_seconds = time.perf_counter() - start
            for stage in STAGES:
                stage_totals[stage] += float(np.sum(batch.pop(f"_t_{stage}")))
            writer.add(batch)
    missing = source.unaccounted(todo, writer.written)
    if missing:  # never expected; if Ray ever loses rows, they still get their row, flagged
        log.error("%d inputs came back with no result; writing them as error rows", len(missing))
        writer.add(_error_batch(model, missing, "no result came back from the pipeline", cfg))
    writer.flush()
    stage_totals["write"] = writer.seconds
    summary.rows_ok = writer.counts["ok"] + _count_resumed(out, done, "ok")
    summary.rows_error = writer.counts["error"] + _count_resumed(out, done, "error")
    summary.seconds = time.perf_counter() - start
    rows = writer.counts["ok"] + writer.counts["error"]  # this run's rows (a shard holds many)
    summary.images_per_second = rows / summary.seconds if summary.seconds else 0.0
    summary.stage_seconds = {k: round(v, 4) for k, v in stage_totals.items()}
    summary.stage_ms_per_image = {
        k: round(1000 * v / max(rows, 1), 4) for k, v in stage_totals.items()
    }
    summary.completed = True
    out.write_json(SUMMARY, summary.to_json())
    return summary


def prepare_output(out: OutputDir, cfg: RunConfig, listing: Listing, model: Model) -> set[str]:
    """Make ``out`` ready for this run; return the input paths already committed there."""
    manifest = {
        "input": cfg.input,
        "inputs": len(listing.paths),
        "listing_sha256": _listing_digest(listing.paths),
        "model": model.fingerprint,
        "model_name": model.name,
        "top_k": cfg.top_k,
        "logits": cfg.logits,
        "compute_dtype": cfg.compute_dtype,
        "source": Source.of(cfg).describe(),
    }
    if out.has_results():
        if cfg.overwrite:
            out.clear()
        elif not cfg.resume:
            raise OutputError(
                f"Output '{cfg.output}' already holds results; pass --overwrite to replace "
                "them or --resume to finish an interrupted run."
            )
    if cfg.resume:
        before = out.read_json(MANIFEST)
        if before is not None:
            _check_resumable(cfg.output, before, manifest)
            return Source.of(cfg).committed(out.committed_paths(), listing.paths)
    out.write_json(MANIFEST, manifest)
    return set()


def _check_resumable(output: str, before: dict, now: dict) -> None:
    if before.get("model") != now["model"]:
        raise OutputError(
            f"Cannot resume into '{output}': its rows were made by model {before.get('model')}, "
            f"this run uses {now['model']}. Use --overwrite to start again."
        )
    if before.get("listing_sha256") != now["listing_sha256"]:
        raise OutputError(
            f"Cannot resume into '{output}': the input listing changed since that run "
            f"({before.get('inputs')} images then, {now['inputs']} now). Use --overwrite."
        )
    source = before.get("source", {"format": "images"})
    if source != now["source"]:  # the source decides the row ids
        raise OutputError(
            f"Cannot resume into '{output}': it was read as {source}, this run reads "
            f"{now['source']}; match it or use --overwrite."
        )
    for key in ("top_k", "logits", "compute_dtype"):  # all part files must share one schema
        if before.get(key) != now[key]:
            raise OutputError(
                f"Cannot resume into '{output}': it was written with {key}={before.get(key)}, "
                f"this run asks for {key}={now[key]}; match it or use --overwrite."
            )


def _listing_digest(paths: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _count_resumed(out: OutputDir, done: set[str], status: str) -> int:
    if not done:
        return 0
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for part in out.parts():
        table = pq.read_table(part, columns=["path", "status"], filesystem=out.fs)
        mask = pc.and_(pc.equal(table["status"], status), pc.is_in(table["path"], _pa_set(done)))
        total += pc.sum(mask.cast("int64")).as_py() or 0
    return total


def _pa_set(paths: set[str]):
    import pyarrow as pa

    return pa.array(sorted(paths), type=pa.string())


def _error_batch(model: Model, paths: list[str], message: str, cfg: RunConfig) -> dict[str, Any]:
    outputs = np.zeros((len(paths), model.spec.output_dim), np.float32)
    logits = outputs if cfg.logits else None
    batch = result_columns(model, outputs, [message] * len(paths), cfg.top_k, logits)
    batch["path"] = np.asarray(paths, dtype=object)
    return batch


def _execute(cfg: RunConfig, paths: list[str], spec, source: Source, done: set[str]):
    """Yield result batches (numpy dicts) from the Ray Data pipeline over ``paths`` (files or
    shards; rows in ``done`` are skipped inside shards)."""
    import ray

    _ensure_ray(cfg.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    actors = _actor_count(cfg)
    # The default count is what the cluster holds now (its GPUs, or its nodes): start them all,
    # since Ray Data grows a pool only once its running actors are busy, too late for a short
    # run. An explicit --actors is a ceiling to grow to, e.g. on a cluster that autoscales.
    min_actors = actors if cfg.actors is None else 1
    rows = _rows_per_block(len(paths), actors, cfg.batch_size)
    run_id = uuid.uuid4().hex  # names what the actors' crash guards record in the GCS
    ds = ray.data.from_arrow(source.blocks(paths, done, rows))
    ds = ds.map_batches(
        _decode_block,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"source": source, "spec": spec, "max_pixels": cfg.max_pixels},
        **_decode_resources(),
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_path": cfg.model, "model_fn": cfg.model_fn,
            "batch_size": cfg.batch_size, "top_k": cfg.top_k, "logits": cfg.logits,
            "compute_dtype": cfg.compute_dtype,
            "platform": None if cfg.gpus_per_actor > 0 else "cpu", "run_id": run_id,
        },
        # A whole decode block per call; the actor feeds it to the device batch_size rows at
        # a time. Ray Data's own cost per call (~3 ms: slicing, format conversion, output
        # block) paid once per 32 rows was 60% of the actor's time on CPU.
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


def _decode_resources() -> dict[str, Any]:
    # Decode tasks read the inputs: give them the driver's object-store settings (endpoint,
    # region, keys), which nodes started elsewhere do not have. Nothing set, nothing passed:
    # tasks with their own runtime_env need worker processes of their own.
    env = storage_env()
    # Half a CPU per decode task: on CPU the inference actor holds one CPU but is mostly idle
    # (its model is ~4x cheaper than a decode), so two decoders per spare core keep every core
    # busy. The differing request also keeps Ray Data from fusing decode into the actor,
    # which would serialise decode behind inference in one process per node.
    resources: dict[str, Any] = {"num_cpus": DECODE_CPUS}
    if env:
        resources["runtime_env"] = {"env_vars": env}
    return resources


def _rows_per_block(n: int, actors: int, batch_size: int) -> int:
    """Rows per decode block: at most ROWS_PER_BLOCK, a whole number of model batches, and
    small enough that a small input still makes two blocks per actor: a block goes to one
    actor, so 200 images in one block would keep every GPU but one idle."""
    per_actor = -(-n // (2 * actors))
    return max(batch_size, min(ROWS_PER_BLOCK, batch_size * -(-per_actor // batch_size)))


def _decode_block(batch: dict[str, np.ndarray], source: Source, spec, max_pixels: int):
    # A generator: a shard becomes several blocks of decoded rows, never one huge one.
    yield from source.decode(batch, spec, max_pixels)


def _ensure_ray(address: str | None) -> None:
    import os

    import ray

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
    import ray

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
