"""``pipeline.run``: list -> decode (Ray tasks) -> infer (Ray actor pool) -> write (driver).

Everything is checked before any image is read: the model loads and traces for its input
shape, the input lists to at least one image, the output directory is usable as asked.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.device import pin_to_cpu
from pipeline.infer import empty_outputs, result_columns
from pipeline.model import Model, ModelError, check_model, load_model
from pipeline.read import Listing
from pipeline.shards import Source
from pipeline.write import MANIFEST, SUMMARY, OutputDir, OutputError, ResultWriter, output_schema

log = logging.getLogger(__name__)

# Seconds per stage, summed over rows: decode (the decode tasks), dispatch (host time issuing
# device work), wait (host time blocked on device results: near zero, the device is
# starved), infer (the actor's wall time per block), write.
STAGES = ("decode", "dispatch", "wait", "infer")


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
    pin_to_cpu()  # the driver traces and lowers; it leaves every accelerator to the actors
    model = load_model(cfg.model, cfg.model_fn)
    check_model(model, cfg.batch_size, cfg.actor_platform, cfg.compute_dtype)
    if cfg.logits and model.spec.output != "classification":
        raise ModelError(
            f"{model.source} returns embeddings; --logits is for classification models (the "
            "embedding column already holds the raw values)."
        )
    source = Source.of(cfg)
    listing = source.list(cfg.input)
    out = OutputDir(cfg.output)
    done = prepare_output(out, cfg, listing, model)  # path -> status of rows already written
    todo = source.todo(listing.paths, done.keys())
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
        from pipeline.dataflow import execute  # imports Ray: only when there is work

        for batch in execute(cfg, todo, model.spec, source, done.keys(), model.fingerprint):
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
    resumed = Counter(done.values())
    summary.rows_ok = writer.counts["ok"] + resumed["ok"]
    summary.rows_error = writer.counts["error"] + resumed["error"]
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


def prepare_output(
    out: OutputDir, cfg: RunConfig, listing: Listing, model: Model
) -> dict[str, str]:
    """Make ``out`` ready for this run; return the rows of these inputs already committed
    there (on ``--resume``), path -> status."""
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
            status = out.committed_status()  # one read of the part files
            mine = Source.of(cfg).committed(set(status), listing.paths)
            return {path: status[path] for path in mine}
    out.write_json(MANIFEST, manifest)
    return {}


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


def _error_batch(model: Model, paths: list[str], message: str, cfg: RunConfig) -> dict[str, Any]:
    outputs = empty_outputs(model.spec, len(paths), cfg.top_k, cfg.logits)
    batch = result_columns(model.fingerprint, model.spec, outputs, [message] * len(paths))
    batch["path"] = np.asarray(paths, dtype=object)
    return batch
