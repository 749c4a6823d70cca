"""Infer stage: the Ray Data actor that holds a compiled model on its device(s).

A thin wrapper around :class:`pipeline.device.Executor`. At start each actor pins JAX to its
platform and insists on it (an actor that reserved a GPU on a node whose jaxlib has no CUDA
fails loudly, naming the node, instead of computing on the CPU), loads the model, compiles it
ahead of time (unit and device-batch shapes), runs the canary batch, and checks that rows do
not influence each other. Per block it runs the decoded images through the executor (crash
guard around it) and turns the outputs into result columns.

When a call fails and the canary fails too, the device is broken, not the images: the actor
process exits, Ray starts a new one and retries its blocks; after MAX_DEVICE_FAILURES such
exits of one actor the run stops with the device's error instead of writing error rows. A
call that never returns is killed by a watchdog (:class:`pipeline.crash_guard.HangWatch`):
a hang at start (the canary batch) counts as such a device failure; one in a block is
pinned on its image by the crash guard, as a crash is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from pipeline import device, platforms
from pipeline.crash_guard import CrashGuard, HangWatch
from pipeline.machine import where
from pipeline.model import ModelError, ModelSpec, load_model
from pipeline.visible import Witnesses
from pipeline.write import PartWriter, output_schema

log = logging.getLogger(__name__)

# A device that fails this many times in one actor (each time replaced by a fresh process,
# each time failing again) is not coming back: stop the run rather than retry for ever.
MAX_DEVICE_FAILURES = 3
# Seconds each stage spent per block: decode (the decode task), dispatch (host time issuing
# device work), wait (host time blocked on device results; near zero: the device is
# starved), infer (the actor's wall time for the block). The actor adds write.
STAGES = ("decode", "dispatch", "wait", "infer")
# Exit status of an actor that found its device broken (EX_TEMPFAIL: try again elsewhere).
DEVICE_FAILURE_EXIT = 75
# A device call that gives no result for this long hangs (--infer-timeout; see
# crash_guard.HangWatch): SLACK times what the canary batch's first call took, scaled to a
# device batch, and never under FLOOR. A device batch takes milliseconds to a few seconds on
# a GPU and up to about a minute for a CLIP-L batch on a few CPU cores; a call 50 times
# slower than its own first call (which includes one-off start-up costs) is not slow but
# stuck. The floor covers the calls before any is timed, and noisy shared CPUs.
INFER_TIMEOUT_FLOOR = 120.0
INFER_TIMEOUT_SLACK = 50.0
_FIX = {
    "gpu": "install the CUDA build of jaxlib there (pip install 'jax[cuda12]'), or run "
           "without --gpus-per-actor; --platform cpu computes on the CPU on purpose",
    "cpu": "check the node's jaxlib installation",
}


class Predictor:
    """Ray Data callable class: a decoded block in, prediction columns out."""

    def __init__(
        self, model_path: str | None, model_fn: str | None, batch_size: int, top_k: int,
        logits: bool = False, compute_dtype: str = "float32", run_id: str | None = None,
        platform: str = "cpu", fingerprint: str | None = None,
        device_batch_size: int | None = None, output: str | None = None,
        rows_per_file: int = 10_000, weights: str = "", infer_timeout: float | None = None,
        witnesses: Witnesses | None = None,
    ):
        start = time.perf_counter()
        if witnesses is not None:  # a node that cannot see a local output would write its
            witnesses.check(inputs=False)  # parts where nobody else does
        # In a Ray run: images that kill this process are found across its restarts.
        self.guard = CrashGuard(run_id) if run_id else None
        self._gave_up: device.DeviceFailure | None = None
        failures, reason = self.guard.device_failures() if self.guard else (0, "")
        if failures >= MAX_DEVICE_FAILURES:  # its device hung at start, again and again
            self._gave_up = _giving_up(failures, reason)
            return
        platforms.configure(platform)
        try:
            devices = platforms.select_devices(platform)
        except platforms.DeviceError as e:
            fix = _FIX.get(platform, _FIX["cpu"])
            raise platforms.DeviceError(f"{where()}: {e}; {fix}.") from e
        self.model = load_model(model_path, model_fn, weights=weights)  # the driver's version
        self.spec: ModelSpec = self.model.spec
        self.fingerprint = fingerprint or self.model.fingerprint
        self.logits = logits and self.spec.output == "classification"
        self.top_k = min(top_k, self.spec.output_dim)
        program = self.model.program(self.top_k, self.logits, compute_dtype)
        self.executor = device.Executor(
            program, self.model.compute_params(compute_dtype), self.spec.shape, batch_size,
            device_batch_size, devices, canary=False,
        )
        # Compiled: from here on a device call that never returns is a hang (see
        # crash_guard.HangWatch). Until a call has been timed, the floor is the limit.
        self.watch = HangWatch(self._hung, lambda: self.executor.last_result,
                               name="infer-watchdog") if run_id else None
        self._starting = False  # what the watch watches: start-up (the device) or a block
        self.limit = infer_timeout or INFER_TIMEOUT_FLOOR
        with self._watching(starting=True):
            self.executor.warm_up()
            moved = self.executor.mixing()
        if infer_timeout is None:
            batches = self.executor.device_batch / batch_size
            self.limit = max(INFER_TIMEOUT_FLOOR,
                             INFER_TIMEOUT_SLACK * batches * self.executor.canary_seconds)
        if moved is not None:
            raise ModelError(
                f"{self.model.source}: row 0's outputs change (by up to {moved:.3g}) when the "
                "other rows of its batch change, so padding and neighbours would alter real "
                "results; put the model in inference mode (BatchNorm on running statistics, "
                "no dropout: e.g. train=False, model.eval(), eqx.nn.inference_mode)."
            )
        # In a run: this actor commits its own results (see pipeline.write); without an
        # output, __call__ returns the result columns instead (tests, benchmarks).
        self.writer = None
        if output is not None:
            schema = output_schema(self.spec, self.logits)
            self.writer = PartWriter(output, schema, rows_per_file)
        self.where = {**_node(), "pid": os.getpid(), "device": self.executor.describe()}
        self.device_lock = threading.Lock()  # two calls in flight share one device
        self._isolated = False
        log.info(
            "Predictor pid %d: model %s on %s, compiled in %.2fs (ready in %.2fs)",
            os.getpid(), self.fingerprint, self.executor.describe(),
            self.executor.compile_seconds, time.perf_counter() - start,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A decoded block -> its part records (in a run), or its result columns."""
        if self._gave_up is not None:  # the run is stopping: every call says why, once more
            raise self._gave_up
        result = self.predict(batch)
        isolated = result.pop("_isolated")
        if self.writer is None:
            return result
        start = time.perf_counter()
        units = np.asarray(batch["_unit"])
        records = self.writer.write(result, units)
        seconds = {k: float(np.sum(result[f"_t_{k}"])) for k in STAGES}
        seconds["write"] = time.perf_counter() - start
        out = {k: np.asarray([r[k] for r in records]) for k in records[0]}
        for stage, total in seconds.items():  # the block's, on its first part
            out[f"t_{stage}"] = np.array([total] + [0.0] * (len(records) - 1))
        for key, value in self.where.items():
            out[key] = np.asarray([value] * len(records))
        # For the driver's messages: this actor's process is a replacement, or this block
        # killed one (and ran one image at a time).
        out["restarted"] = np.full(len(records), bool(self.guard and self.guard.recording))
        out["isolated"] = np.full(len(records), isolated)
        return out

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A decoded block -> result columns (``pipeline.write.output_schema``'s, plus the
        per-row seconds of each stage as ``_t_<stage>``)."""
        images = batch["image"]  # (B, H, W, C) uint8
        errors = [e or None for e in batch["error"]]  # "" on the wire means ok
        kinds = [k or None for k in batch.get("error_kind", [None] * len(errors))]
        good = np.flatnonzero([e is None for e in errors])
        every = len(good) == len(images)  # the usual block: a view, not a copy
        rows = slice(None) if every else good
        start = time.perf_counter()
        with self.device_lock, self._watching():
            before = dict(self.executor.seconds)
            outputs, model_errors = self._run(images[rows], batch["path"][rows])
            spent = {k: v - before[k] for k, v in self.executor.seconds.items()}
            isolated = self._isolated
        spent["infer"] = time.perf_counter() - start
        for i, err in zip(good, model_errors):
            if err is not None and errors[i] is None:
                errors[i], kinds[i] = err, model_error_kind(err)
        full = {k: np.zeros((len(images), *v.shape[1:]), v.dtype) for k, v in outputs.items()}
        for k, v in outputs.items():
            full[k][rows] = v
        result = result_columns(self.fingerprint, self.spec, full, errors, kinds)
        result["path"] = batch["path"]
        result["_t_decode"] = batch["_t_decode"]
        for stage, seconds in spent.items():  # spread the block's time over its rows
            result[f"_t_{stage}"] = np.full(len(images), seconds / max(len(images), 1))
        result["_isolated"] = isolated
        return result

    def _run(self, images: np.ndarray, paths: np.ndarray):
        self._isolated = False
        if self._gave_up is not None:  # the run is stopping: every call says why, once more
            raise self._gave_up
        if not len(images):
            return self.executor.zeros(0), []
        try:
            if self.guard is not None:
                result = self.guard.run(self.executor, images, paths)
                self._isolated = self.guard.isolated
                return result
            return self.executor.run_isolating(images)
        except device.DeviceFailure as e:
            if self.guard is None:
                raise
            failures = self.guard.device_failed(str(e))
            if failures >= MAX_DEVICE_FAILURES:
                self._gave_up = _giving_up(failures, str(e))
                raise self._gave_up from e
            log.error("%s: %s; exiting so that Ray replaces this actor", where(), e)
            logging.shutdown()
            os._exit(DEVICE_FAILURE_EXIT)  # Ray restarts the actor and retries its blocks

    @contextlib.contextmanager
    def _watching(self, starting: bool = False):
        """Device work in this block of code: a hang kills the process (in a run).
        ``starting``: the canary batch and start-up checks, whose hang is the device's."""
        if self.watch is None:
            yield
            return
        self._starting = starting
        with self.watch.watching(self.limit):
            yield

    def _hung(self, limit: float) -> None:
        """The watchdog's last word before it kills this process: a hang while starting (the
        canary batch) is the device's; one in a block may be an image's (see CrashGuard)."""
        log.error("The device has given no result for %g s: killing this inference process "
                  "so that Ray replaces it and retries its blocks", limit)
        if self._starting:
            self.guard.device_failed(
                f"the device gave no result for {limit:g} s running the canary batch at "
                f"start ({self.executor.describe()}): it hangs")
        else:
            self.guard.hung(limit)


def _giving_up(failures: int, reason: str) -> device.DeviceFailure:
    return device.DeviceFailure(
        f"{where()}: the device failed {failures} times in this actor, each time in a fresh "
        f"process; giving up: {reason}")


def _node() -> dict[str, str]:
    """This actor's node, for the run's records: Ray's node id and address."""
    import socket

    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except ImportError:
        pass
    return {"node_id": socket.gethostname(), "node_ip": ""}


def model_error_kind(error: str) -> str:
    """``error_kind`` of a row the model stage failed: the process died or hung on it, or the
    model raised or returned NaN/Inf for it."""
    return "model_crash" if error.startswith("the inference process") else "model_failure"


def result_columns(
    fingerprint: str, spec: ModelSpec, outputs: dict[str, np.ndarray], errors: list[str | None],
    kinds: list[str | None] | None = None,
) -> dict[str, Any]:
    """Program outputs (see :meth:`pipeline.model.Model.program`) and per-row errors (and
    their kinds) -> the output columns (values on error rows are placeholders; the writer
    stores nulls there)."""
    n = len(errors)
    ok = np.array([e is None for e in errors], dtype=bool)
    cols: dict[str, Any] = {
        "status": np.where(ok, "ok", "error").astype(object),
        "error": np.asarray(errors, dtype=object),
        "error_kind": np.asarray(kinds if kinds is not None else [None] * n, dtype=object),
        "model": np.full(n, fingerprint, dtype=object),
    }
    if spec.output == "embedding":
        cols["embedding"] = outputs["embedding"]  # (B, D) float32
        return cols
    labels = outputs["topk_labels"]  # (B, k) int32
    scores = outputs["topk_scores"]  # (B, k) float32
    names = np.asarray(spec.class_names, dtype=object)
    cols.update(
        label=labels[:, 0].astype(np.int32),
        label_name=names[labels[:, 0]],
        score=scores[:, 0].astype(np.float32),
        topk_labels=labels.astype(np.int32),
        topk_scores=scores.astype(np.float32),
    )
    if "logits" in outputs:
        cols["logits"] = outputs["logits"].astype(np.float32)  # (B, D)
    return cols


def empty_outputs(spec: ModelSpec, n: int, top_k: int, logits: bool) -> dict[str, np.ndarray]:
    """Zero outputs for ``n`` rows that never reached a model (their rows are errors)."""
    if spec.output == "embedding":
        return {"embedding": np.zeros((n, spec.output_dim), np.float32)}
    k = min(top_k, spec.output_dim)
    out = {"topk_labels": np.zeros((n, k), np.int32), "topk_scores": np.zeros((n, k), np.float32)}
    if logits:
        out["logits"] = np.zeros((n, spec.output_dim), np.float32)
    return out
