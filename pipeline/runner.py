"""``pipeline.run``: list -> decode (Ray tasks) -> infer and write (Ray actors) -> summary.

Everything the user can get wrong is checked before Ray starts: the model loads, traces and
lowers for its input shape, the input lists to at least one unit, the output directory is
usable as asked (and, on ``--resume``, holds rows of this same model and listing). Then the
resource plan is made from the cluster (:mod:`pipeline.plan`), and the driver only counts the
part records the actors send back, so its memory does not grow with the input.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.device import DeviceError, DeviceFailure, pin_to_cpu
from pipeline.fingerprint import resume_refusal
from pipeline.infer import STAGES, empty_outputs, result_columns
from pipeline.listing import ListingFile
from pipeline.model import Model, ModelError, check_model, load_model
from pipeline.shards import Source
from pipeline.write import (
    MANIFEST, SUMMARY, OutputDir, OutputError, PartWriter, Tally, output_schema,
)

log = logging.getLogger(__name__)

TIMELINE_POINTS = 400  # (seconds, rows) pairs kept for the report's throughput chart


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


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for a status line: rows written (this run), of ``expected``
    (None where unknown until read, as for shards), errors so far, elapsed seconds."""

    rows: int
    expected: int | None
    errors: int
    seconds: float


def run(input: str, output: str, **options: Any) -> Summary:
    """Predict every image under ``input`` and write one Parquet row per image to ``output``.

    Options are the fields of :class:`pipeline.config.RunConfig`. Uses the caller's
    ``ray.init()`` if there is one, else ``address`` or a new local Ray.
    """
    return run_config(RunConfig(input=str(input), output=str(output), **options))


class Observer:
    """What a front end (the CLI, the Ray Job) hears of a run; every method may be left as is.
    ``started`` gets what will run (inputs, model, the plan) once it is decided, ``progress``
    follows each committed part, ``event`` says what the user should know, in words."""

    quiet = False  # True: a Ray started for the run keeps its workers' output in log files

    def ray_starting(self) -> None:
        pass

    def started(self, info: dict[str, Any]) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def event(self, message: str) -> None:
        pass


def run_config(cfg: RunConfig, observer: Observer | None = None) -> Summary:
    """Run ``cfg``, telling ``observer`` how it goes."""
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
    _check_usable(out, cfg)
    listing = source.list(cfg.input, cfg.output)
    try:
        fingerprint = _prepare(out, cfg, listing, model, source)
    except BaseException:
        listing.discard()
        if not existed:
            _remove_if_empty(out)
        raise
    listing = listing.moved(cfg.output)
    committed = out.parts()
    resumed = out.tally(committed) if committed else Tally()
    log.info("%d %s listed (%d rows already done), model %s", listing.count,
             cfg.input_format, resumed.ok + resumed.error, fingerprint)
    summary.model, summary.model_name = fingerprint, model.name
    summary.skipped, summary.rows_resumed = listing.skipped, resumed.ok + resumed.error

    from pipeline import dataflow, plan as planning  # import Ray only when there is work

    observer.ray_starting()
    dataflow.ensure_ray(cfg.address, quiet=observer.quiet)
    cluster = planning.Cluster.from_ray()
    plan = planning.make_plan(
        cfg, cluster, units=listing.count, image_bytes=int(np.prod(model.spec.shape)),
        flops_per_image=flops, largest_shard=listing.largest if source.sharded else None)
    for note in plan.notes:
        log.info("plan: %s", note)
    summary.plan = plan.to_json()
    summary.nodes = [{"node_id": n.node_id, "node_ip": n.ip, "cpus": n.cpus, "gpus": n.gpus,
                      "memory_gb": round(n.memory / 1e9, 1)} for n in cluster.nodes]
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
    tally, stats, watch = Tally(), _Stats(start), _Watch(observer, cluster)
    try:
        if expected != 0:
            records = dataflow.execute(cfg, plan, listing, committed, model.spec, source,
                                       fingerprint, run_id)
            for batch in records:
                stats.add(batch, tally)
                watch.records(batch)
                if summary.first_result_seconds is None:
                    summary.first_result_seconds = time.perf_counter() - start
                observer.progress(Progress(stats.rows, expected, tally.error, stats.elapsed()))
    except Exception as e:
        if not committed and not out.parts():  # nothing to resume: leave no trace
            out.clear()
            if not existed:
                _remove_if_empty(out)
        ours = our_error(e)
        if ours is not None:  # one line, not Ray's wrapping of a worker's traceback
            raise ours from None
        raise
    finally:
        from pipeline.crash_guard import forget_run

        forget_run(run_id)
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


class _Stats:
    """Counts the part records as they come: rows, stage seconds, parts, actors, timeline."""

    def __init__(self, start: float):
        self.start = start
        self.rows = 0
        self.parts = 0
        self.seconds = dict.fromkeys((*STAGES, "write"), 0.0)
        self.actors: dict[tuple[str, int], dict[str, Any]] = {}
        self.timeline: list[list[float]] = [[0.0, 0]]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, batch: dict[str, np.ndarray], tally: Tally) -> None:
        import json

        for i in range(len(batch["part"])):
            rows = int(batch["rows"][i])
            self.rows += rows
            self.parts += 1
            part = Tally(ok=int(batch["ok"][i]), error=int(batch["error"][i]))
            for kind, info in json.loads(batch["kinds"][i]).items():
                part.kinds[kind] += info["count"]
                part.examples[kind] = info["examples"]
            tally.merge(part)
            for stage in self.seconds:
                self.seconds[stage] += float(batch[f"t_{stage}"][i])
            key = (str(batch["node_id"][i]), int(batch["pid"][i]))
            actor = self.actors.setdefault(key, {
                "node_id": key[0], "node_ip": str(batch["node_ip"][i]), "pid": key[1],
                "device": str(batch["device"][i]), "rows": 0})
            actor["rows"] += rows
        self.timeline.append([round(self.elapsed(), 3), self.rows])

    def finish(self, summary: Summary) -> None:
        summary.seconds = self.elapsed()
        summary.images_per_second = self.rows / summary.seconds if summary.seconds else 0.0
        summary.stage_seconds = {k: round(v, 4) for k, v in self.seconds.items()}
        summary.stage_ms_per_image = {
            k: round(1000 * v / max(self.rows, 1), 4) for k, v in self.seconds.items()
        }
        summary.parts = self.parts
        summary.actors = list(self.actors.values())
        step = max(1, len(self.timeline) // TIMELINE_POINTS)
        summary.timeline = self.timeline[::step] + ([self.timeline[-1]] if step > 1 else [])
        summary.timeline.append([round(summary.seconds, 3), self.rows])


class _Watch:
    """Turns what the records and the cluster show into events for the user, once each."""

    NODE_CHECK_SECONDS = 5.0

    def __init__(self, observer: Observer, cluster):
        self.observer = observer
        self.alive = {n.node_id: n.ip for n in cluster.nodes}
        self.checked = time.monotonic()
        self.seen: set[tuple[str, int]] = set()

    def records(self, batch: dict[str, np.ndarray]) -> None:
        for i in range(len(batch["part"])):
            actor = (str(batch["node_id"][i]), int(batch["pid"][i]))
            if actor not in self.seen:
                self.seen.add(actor)
                if bool(batch["restarted"][i]):
                    self.observer.event(
                        f"an inference actor's process on node {batch['node_ip'][i]} died and "
                        "was replaced; Ray retried the blocks it held (no row is lost or "
                        "written twice)")
            if bool(batch["isolated"][i]):
                self.observer.event(
                    f"a block killed an inference process; it was run again one image at a "
                    f"time to find the image that does ({batch['rows'][i]} rows in "
                    f"{batch['part'][i]})")
        if time.monotonic() - self.checked > self.NODE_CHECK_SECONDS:
            self.checked = time.monotonic()
            self._nodes()

    def _nodes(self) -> None:
        import ray

        now = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n["Alive"]}
        for node, ip in self.alive.items():
            if node not in now:
                self.observer.event(f"node {ip} left the cluster; Ray redoes its work on the "
                                    "nodes that remain")
        for node, ip in now.items():
            if node not in self.alive:
                self.observer.event(f"node {ip} joined the cluster")
        self.alive = now


def _check_usable(out: OutputDir, cfg: RunConfig) -> None:
    if out.has_results():
        if cfg.overwrite:
            out.clear()
        elif not cfg.resume:
            raise OutputError(
                f"Output '{cfg.output}' already holds results; pass --overwrite to replace "
                "them or --resume to finish an interrupted run."
            )


def _prepare(out: OutputDir, cfg: RunConfig, listing: ListingFile, model: Model,
             source: Source) -> str:
    """Check a ``--resume`` against the manifest there and write this run's manifest;
    returns the fingerprint the run's rows carry."""
    identity = model.identity
    manifest = {
        "input": cfg.input,
        "inputs": listing.count,
        "listing_sha256": listing.sha256,
        "model": identity.fingerprint,
        "model_name": model.name,
        "model_identity": identity.to_json(),
        "top_k": cfg.top_k,
        "logits": cfg.logits,
        "compute_dtype": cfg.compute_dtype,
        "source": source.describe(),
    }
    before = out.read_json(MANIFEST) if cfg.resume else None
    if before is not None:
        _check_resumable(cfg.output, before, manifest)
        if before["model"] != identity.fingerprint:  # same model under another JAX
            log.warning(
                "JAX %s traces this model to another program text than JAX %s did; weights, "
                "spec and source are unchanged, so resumed rows keep fingerprint %s",
                identity.jax, before["model_identity"].get("jax"), before["model"])
            manifest["model"] = before["model"]
            manifest["model_identity"] = before["model_identity"]
    out.write_json(MANIFEST, manifest)
    return manifest["model"]


def _check_resumable(output: str, before: dict, now: dict) -> None:
    if before.get("model") != now["model"]:
        why = resume_refusal(before.get("model_identity"), _identity(now))
        if why is not None:
            raise OutputError(
                f"Cannot resume into '{output}': its rows were made by model "
                f"{before.get('model')}, this run uses {now['model']} ({why}). Use --overwrite "
                "to start again."
            )
    if before.get("listing_sha256") != now["listing_sha256"]:
        raise OutputError(
            f"Cannot resume into '{output}': the input listing changed since that run "
            f"({before.get('inputs')} inputs then, {now['inputs']} now). Use --overwrite."
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


def _identity(manifest: dict):
    from pipeline.fingerprint import ModelIdentity

    return ModelIdentity(**manifest["model_identity"])


def _remove_if_empty(out: OutputDir) -> None:
    try:
        if not out.entries():
            out.fs.delete_dir(out.root)
    except OSError:
        pass


def _write_missing(out: OutputDir, cfg: RunConfig, model: Model, fingerprint: str,
                   listing: ListingFile, tally: Tally, stats: _Stats) -> None:
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
# the text of a worker's traceback (an actor's failed __init__ keeps no exception object).
_OURS = {
    "pipeline.device.DeviceError": DeviceError,
    "pipeline.device.DeviceFailure": DeviceFailure,
    "pipeline.model.ModelError": ModelError,
}


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
