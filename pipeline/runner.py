"""``pipeline.run``: list -> decode (Ray tasks) -> infer and write (Ray actors) -> summary.

Everything the user can get wrong is checked before Ray starts: the model loads, traces and
lowers for its input shape, the input lists to at least one unit, the output directory is
usable as asked (and, on ``--resume``, holds rows of this same model and listing). Then the
resource plan is made from the cluster (:mod:`pipeline.plan`), and the driver only counts the
part records the actors send back, so its memory does not grow with the input.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.crash_guard import StorageHung
from pipeline.device import DeviceFailure
from pipeline.infer import empty_outputs, result_columns
from pipeline.listing import ListingFile
from pipeline.machine import this_node
from pipeline.manifest import prepare
from pipeline.model import Model, ModelError, check_model, load_model
from pipeline.plan import Cluster, PlanError
from pipeline.platforms import DeviceError, pin_to_cpu
from pipeline.progress import Observer, Progress, Stats, Watch  # noqa: F401 (Progress: API)
from pipeline.source import Source
from pipeline.visible import Witnesses
from pipeline.write import (
    SUMMARY,
    OutputDir,
    OutputError,
    OutputLock,
    PartWriter,
    Tally,
    WriteFailure,
    output_schema,
)

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a run did. ``rows_ok + rows_error`` covers every input row, resumed ones included."""

    output: str
    model: str
    input: str = ""
    model_name: str = ""
    started_at: str = ""
    rows_ok: int = 0
    rows_error: int = 0
    rows_resumed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    first_result_seconds: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_ms_per_image: dict[str, float] = field(default_factory=dict)
    timeline: list[list[float]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    actors: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    parts: int = 0
    completed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(input: str, output: str, **options: Any) -> Summary:
    """Predict every image under ``input`` and write one Parquet row per image to ``output``.

    Options are the fields of :class:`pipeline.config.RunConfig`. Uses the caller's
    ``ray.init()`` if there is one, else ``address`` or a new local Ray.
    """
    return run_config(RunConfig(input=str(input), output=str(output), **options))


def run_config(cfg: RunConfig, observer: Observer | None = None) -> Summary:
    """Run ``cfg``, telling ``observer`` how it goes."""
    cfg = cfg.resolved()
    observer = observer or Observer()
    start = time.perf_counter()
    summary = Summary(output=cfg.output, model="", input=cfg.input,
                      started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    pin_to_cpu()  # the driver traces and lowers; it leaves every accelerator to the actors
    model = load_model(cfg.model, cfg.model_fn)
    flops = check_model(model, cfg.batch_size, cfg.actor_platform, cfg.compute_dtype)
    if cfg.logits and model.spec.output != "classification":
        raise ModelError(
            f"{model.source} returns embeddings; --logits is for classification models (the "
            "embedding column already holds the raw values)."
        )
    source = Source.of(cfg)
    out = OutputDir(cfg.output)
    existed = out.fs.get_file_info(out.root).type.name != "NotFound"
    # One run at a time writes an output, from its listing on.
    with _held(out, cfg, existed) as lock:
        listing = source.list(cfg.input, cfg.output)
        try:
            fingerprint = prepare(out, cfg, listing, model, source)
        except BaseException:
            listing.discard()
            raise
        listing = listing.moved(cfg.output)
        committed = out.parts()
        resumed, unreadable = out.tally(committed) if committed else (Tally(), [])
        for name in unreadable:  # a truncated or damaged file: its rows are computed again
            note = f"part {name} cannot be read: renamed {out.set_aside(name)}; its rows are redone"
            log.warning("%s", note)
            observer.event(note)
        committed = [name for name in committed if name not in unreadable]
        log.info("%d %s listed (%d rows already done), model %s", listing.count,
                 cfg.input_format, resumed.ok + resumed.error, fingerprint)
        summary.model, summary.model_name = fingerprint, model.name
        summary.skipped, summary.rows_resumed = listing.skipped, resumed.ok + resumed.error

        from pipeline import dataflow  # import Ray only when there is work

        # Until the actors start, a failure (no Ray, a plan the cluster cannot run) leaves no
        # trace. After, an actor may still commit the block it holds, so the listing and manifest
        # stay beside whatever it commits: a rerun with --resume, or a plain one when no part
        # came, finishes cleanly.
        records = None  # once set, the actors may commit parts at any time
        try:
            observer.ray_starting()
            dataflow.ensure_ray(cfg.address, quiet=observer.quiet)
            cluster, plan = _plan(cfg, model, listing, source, flops, summary)
            weights = _actor_weights(cfg, model, cluster)
            witnesses = Witnesses.of(cfg.input, cfg.output, listing, this_node())
            dataflow.check_nodes_see(witnesses, cluster)
            expected = None if source.sharded else listing.count - summary.rows_resumed
            observer.started({
                "input": cfg.input, "inputs": listing.count, "format": cfg.input_format,
                "skipped": listing.skipped, "resumed": summary.rows_resumed, "expected": expected,
                "model": fingerprint, "model_name": model.name,
                "model_shape": "x".join(map(str, model.spec.shape)) + f", {model.spec.output_dim} "
                               + ("classes" if model.spec.output == "classification" else "dims"),
                "plan": summary.plan, "output": cfg.output, "session_dir": dataflow.session_dir(),
            })
            run_id = uuid.uuid4().hex  # names what the actors' crash guards record in the GCS
            tally, stats, watch = Tally(), Stats(start), Watch(observer, cluster)
            try:
                if expected != 0:
                    records = dataflow.execute(cfg, plan, listing, committed, model.spec, source,
                                               fingerprint, run_id, weights, witnesses)
                    for batch in records:
                        _still_held(lock, cfg)
                        stats.add(batch, tally)
                        watch.records(batch)
                        if summary.first_result_seconds is None:
                            summary.first_result_seconds = time.perf_counter() - start
                        observer.progress(
                            Progress(stats.rows, expected, tally.error, stats.elapsed()))
            finally:
                from pipeline.crash_guard import forget_run

                if records is not None:  # stopped early (Ctrl-C): stop Ray Data's execution
                    records.close()  # now, not when the interpreter exits and logs it
                forget_run(run_id)
        except Exception as e:
            if records is None and not committed:
                out.clear()  # and _held removes the directory if this run made it
            ours = our_error(e)
            if ours is not None:  # one line, not Ray's wrapping of a worker's traceback
                raise ours from None
            raise
        if expected is not None and stats.rows < expected:
            _write_missing(out, cfg, model, fingerprint, listing, tally, stats)
        out.remove_temporaries()  # a writer killed mid-part leaves its temporary; none run now
        resumed.merge(tally)
        summary.rows_ok, summary.rows_error = resumed.ok, resumed.error
        summary.errors_by_kind = resumed.by_kind()
        stats.finish(summary)
        summary.completed = True
        out.write_json(SUMMARY, summary.to_json())
        _write_report(cfg.output, summary)
        return summary


def _plan(cfg: RunConfig, model: Model, listing: ListingFile, source: Source, flops: float,
          summary: Summary):
    """The cluster as Ray sees it, and the plan for this run on it (noted in ``summary``)."""
    from pipeline import plan as planning

    cluster = planning.Cluster.from_ray()
    plan = planning.make_plan(
        cfg, cluster, units=listing.count, image_bytes=int(np.prod(model.spec.shape)),
        flops_per_image=flops, largest_shard=listing.largest if source.sharded else None)
    for note in plan.notes:
        log.info("plan: %s", note)
    summary.plan = plan.to_json()
    summary.nodes = [{"node_id": n.node_id, "node_ip": n.ip, "cpus": n.cpus, "gpus": n.gpus,
                      "memory_gb": round(n.memory / 1e9, 1)} for n in cluster.nodes]
    return cluster, plan


def _actor_weights(cfg: RunConfig, model: Model, cluster: Cluster) -> str:
    """The weights' version the actors must load: with a digest of a local model's bytes
    where an actor may run on another machine (a node beside the driver's, or one an
    autoscaler may add), whose copy of the path may be another version. A run on this
    machine alone neither reads the weights again nor keeps a digest."""
    here = this_node()
    if cluster.autoscaling or any(n.node_id != here for n in cluster.nodes):
        from pipeline.model_files import with_content

        return with_content(cfg.model, model.weights)
    return model.weights


@contextlib.contextmanager
def _held(out: OutputDir, cfg: RunConfig, existed: bool):
    """Hold the output against other runs for the rest of this one (see
    :meth:`OutputDir.lock`), and only then look at what it holds: ``--overwrite`` must not
    delete the parts of a run still writing them. A directory this run made is removed if it
    ends empty."""
    lock = out.lock()
    try:
        _check_usable(out, cfg)
        yield lock
    finally:
        try:
            if not existed:  # before the release: no other run can have begun to use it
                _remove_if_empty(out, lock)
        finally:
            lock.release()


def _still_held(lock: OutputLock, cfg: RunConfig) -> None:
    """Stop the run if another may be writing its output (see :mod:`pipeline.output_lock`)."""
    why = lock.lost()
    if why:
        raise WriteFailure(
            f"this run no longer holds its output '{cfg.output}': {why}. Was this driver "
            "suspended, or cut off from the store, for that long? Another run may be writing "
            "the output, so this one stops. Rows already written are kept: once no other run "
            "writes there, run again with --resume")


def _check_usable(out: OutputDir, cfg: RunConfig) -> None:
    if out.has_results():
        if cfg.overwrite:
            out.clear()
        elif not cfg.resume:
            raise OutputError(
                f"Output '{cfg.output}' already holds results; pass --overwrite to replace "
                "them or --resume to finish an interrupted run."
            )


def _remove_if_empty(out: OutputDir, lock: OutputLock) -> None:
    """Delete the output directory if it holds nothing but this run's own claim."""
    try:
        if all(e.base_name == lock.name for e in out.entries()):
            out.fs.delete_dir(out.root)
    except OSError:
        pass


def _write_missing(out: OutputDir, cfg: RunConfig, model: Model, fingerprint: str,
                   listing: ListingFile, tally: Tally, stats: Stats) -> None:
    """Never expected: the rows written fall short of the listing. Find the inputs with no
    row (a full scan, only now) and give each an error row, so every input still has one."""
    written = out.paths_in(out.parts())
    table = listing.read(0, listing.count)
    paths = table.column("path").to_pylist()
    missing = [i for i, p in enumerate(paths) if p not in written]
    if not missing:
        return
    log.error("%d inputs came back with no result; writing them as error rows", len(missing))
    names = [paths[i] for i in missing]
    message = "no result came back from the pipeline"
    outputs = empty_outputs(model.spec, len(names), cfg.top_k, cfg.logits)
    columns = result_columns(fingerprint, model.spec, outputs, [message] * len(names),
                             ["no_result"] * len(names))
    columns["path"] = np.asarray(names, dtype=object)
    writer = PartWriter(cfg.output, output_schema(model.spec, cfg.logits), cfg.rows_per_file)
    for record in writer.write(columns, np.asarray(missing, np.int64)):
        stats.rows += record["rows"]
        stats.parts += 1
    tally.error += len(names)
    tally.add_errors(["no_result"] * len(names), names)


# Errors an actor raises that say what is wrong in one line; Ray hands them to the driver as
# the text of a worker's traceback (an actor's failed __init__ keeps no exception object),
# which names each by the module that defines it.
_OURS = {f"{c.__module__}.{c.__qualname__}": c
         for c in (DeviceError, DeviceFailure, ModelError, PlanError, StorageHung,
                   WriteFailure)}


def our_error(e: BaseException) -> Exception | None:
    """The pipeline's own error behind a Ray error, rebuilt with its one-line message."""
    found = re.findall(r"^\s*(pipeline\.\w+\.\w+): (.+)$", str(e), re.M)
    for name, message in reversed(found):
        if name in _OURS:
            return _OURS[name](message.strip())
    return None


def _write_report(output: str, summary: Summary) -> None:
    from pipeline.report import write_report

    try:
        write_report(output, summary.to_json())
    except Exception as e:  # the rows and the summary are what matter; say why, carry on
        log.warning("Could not write the run report: %s", e)
