"""Infer stage: a compiled, fixed-shape batch runner and the Ray Data actor that holds one.

Each actor loads the model and compiles it ahead of time at start-up for exactly
(batch_size, H, W, C) uint8; a short batch is padded to that shape and the padding dropped
after, so no batch ever recompiles (calling the AOT executable with another shape raises).
One host->device transfer in, one fused program, one device->host transfer out per batch.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.crash_guard import CrashGuard
from pipeline.decode import error_text
from pipeline.model import Model, load_model

log = logging.getLogger(__name__)


class BatchRunner:
    """Runs ``model.forward`` on up to ``batch_size`` images with one compiled program.

    With ``logits=True`` (classification models) each output row is probabilities then logits.
    """

    def __init__(
        self, model: Model, batch_size: int, logits: bool = False, compute_dtype: str = "float32"
    ):
        import functools

        import jax
        import jax.numpy as jnp

        self.model = model
        self.batch_size = batch_size
        self.out_dim = model.spec.output_dim * (2 if logits else 1)
        forward = functools.partial(model.forward, logits=logits, compute_dtype=compute_dtype)
        self.device = jax.devices()[0]
        self.params = jax.device_put(model.params, self.device)  # once, not per batch
        x_spec = jax.ShapeDtypeStruct((batch_size, *model.spec.shape), jnp.uint8)
        start = time.perf_counter()
        try:
            self.compiled = jax.jit(forward).lower(self.params, x_spec).compile()
        except Exception as e:
            raise RuntimeError(
                f"{model.source} does not compile for input {x_spec.shape} uint8: "
                f"{type(e).__name__}: {e}"
            ) from e
        self.compile_seconds = time.perf_counter() - start
        self.compilations = 1
        self.seconds = {"transfer_in": 0.0, "compute": 0.0, "transfer_out": 0.0}

    def run(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W, C) uint8 with n <= batch_size -> (n, D) float32."""
        import jax

        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"batch of {n} is larger than the compiled batch size {self.batch_size}")
        if n < self.batch_size:
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)  # (B, H, W, C)
            padded[:n] = images
            images = padded
        t0 = time.perf_counter()
        x = jax.device_put(np.ascontiguousarray(images), self.device).block_until_ready()
        t1 = time.perf_counter()
        y = self.compiled(self.params, x).block_until_ready()
        t2 = time.perf_counter()
        out = np.asarray(y)[:n]  # (n, D) float32: the one device->host copy
        t3 = time.perf_counter()
        self.seconds["transfer_in"] += t1 - t0
        self.seconds["compute"] += t2 - t1
        self.seconds["transfer_out"] += t3 - t2
        return out

    def run_isolating(self, images: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Like :meth:`run`, but a failing batch is bisected until the bad rows are found.

        Returns outputs (rows of failed images are zero) and a per-row error (None when ok).
        Halves are padded to the same compiled shape, so bisection never recompiles.
        """
        n = len(images)
        out = np.zeros((n, self.out_dim), np.float32)
        errors: list[str | None] = [None] * n
        pending = [(0, n)]
        while pending:
            lo, hi = pending.pop()
            try:
                result = self.run(images[lo:hi])
            except Exception as e:  # a failing batch is bisected, a failing image is an error row
                if hi - lo == 1:
                    errors[lo] = f"model failed on this image: {error_text(e)}"
                else:
                    mid = (lo + hi) // 2
                    pending += [(mid, hi), (lo, mid)]
                continue
            out[lo:hi] = result
            for i in np.flatnonzero(~np.isfinite(result).all(axis=1)):
                errors[lo + i] = "model output is NaN or Inf for this image"
        return out, errors


def _configure_jax(platform: str | None) -> None:
    """Pick the JAX platform and turn on the persistent compilation cache, before JAX starts.

    Setting the platform here rather than through a runtime_env lets Ray hand the actor a
    prestarted worker process (a runtime_env needs a fresh one: about a second more per actor).
    The cache saves the XLA compile (~0.4 s) on every actor start after the first; it lives
    in the user's own 0700 directory, because whoever can write it can run code in our actors.
    """
    import jax

    if platform:
        jax.config.update("jax_platforms", platform)
    cache = Path.home() / ".cache" / "batch-infer" / "xla"
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = cache.stat()
    except OSError as e:
        log.warning("No compilation cache (%s); compiling from scratch", e)
        return
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        log.warning("Not using compilation cache %s: not private to this user", cache)
        return
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class Predictor:
    """Ray Data callable class: decoded batch in, prediction columns out."""

    def __init__(
        self, model_path: str | None, model_fn: str | None, batch_size: int, top_k: int,
        logits: bool = False, compute_dtype: str = "float32", run_id: str | None = None,
        platform: str | None = None,
    ):
        start = time.perf_counter()
        _configure_jax(platform)
        self.model = load_model(model_path, model_fn)
        # In a Ray run: images that kill this process are found across its restarts.
        self.guard = CrashGuard(run_id) if run_id else None
        self.logits = logits and self.model.spec.output == "classification"
        self.runner = BatchRunner(self.model, batch_size, self.logits, compute_dtype)
        self.top_k = min(top_k, self.model.spec.output_dim)
        log.info(
            "Predictor pid %d: model %s on %s, compiled in %.2fs (ready in %.2fs)",
            os.getpid(), self.model.fingerprint, self.runner.device,
            self.runner.compile_seconds, time.perf_counter() - start,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = batch["image"]  # (B, H, W, C) uint8
        errors = [e or None for e in batch["error"]]  # "" on the wire means ok
        ok = np.array([e is None for e in errors], dtype=bool)
        before = dict(self.runner.seconds)
        outputs = np.zeros((len(images), self.runner.out_dim), np.float32)  # (B, D) or (B, 2D)
        good = np.flatnonzero(ok)
        every = len(good) == len(images)  # the usual block: slices, views rather than copies
        for start in range(0, len(good), self.runner.batch_size):  # device batches of B rows
            rows = slice(start, start + self.runner.batch_size)
            idx = rows if every else good[rows]
            if self.guard is not None:
                result = self.guard.run(self.runner, images[idx], batch["path"][idx])
            else:
                result = self.runner.run_isolating(images[idx])
            outputs[idx], model_errors = result
            for i, err in zip(good[rows], model_errors):
                if err is not None:
                    errors[i] = err
        d = self.model.spec.output_dim
        logits = outputs[:, d:] if self.logits else None  # (B, D) raw logits
        result = result_columns(self.model, outputs[:, :d], errors, self.top_k, logits)
        result["path"] = batch["path"]
        result["_t_decode"] = batch["_t_decode"]
        for stage, total in self.runner.seconds.items():  # spread batch time over its rows
            result[f"_t_{stage}"] = np.full(len(images), (total - before[stage]) / len(images))
        return result


def result_columns(
    model: Model, outputs: np.ndarray, errors: list[str | None], top_k: int,
    logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Model outputs (B, D) and per-row errors -> the output columns (values on error rows are
    placeholders; the writer stores nulls there). ``logits`` (B, D) adds a ``logits`` column."""
    spec = model.spec
    n = len(errors)
    ok = np.array([e is None for e in errors], dtype=bool)
    cols: dict[str, Any] = {
        "status": np.where(ok, "ok", "error").astype(object),
        "error": np.asarray(errors, dtype=object),
        "model": np.full(n, model.fingerprint, dtype=object),
    }
    if spec.output == "embedding":
        cols["embedding"] = outputs  # (B, D) float32
        return cols
    k = min(top_k, spec.output_dim)
    order = np.argsort(-outputs, axis=1, kind="stable")[:, :k]  # (B, k)
    scores = np.take_along_axis(outputs, order, axis=1)  # (B, k) float32
    names = np.asarray(spec.class_names, dtype=object)
    cols.update(
        label=order[:, 0].astype(np.int32),
        label_name=names[order[:, 0]],
        score=scores[:, 0].astype(np.float32),
        topk_labels=order.astype(np.int32),
        topk_scores=scores.astype(np.float32),
    )
    if logits is not None:
        cols["logits"] = logits.astype(np.float32)  # (B, D)
    return cols
