"""Drive an accelerator: pick it, compile for it once, keep it busy, tell a broken device from
a bad image.

Below both the model contract (:mod:`pipeline.model`) and the Ray actor (:mod:`pipeline.infer`):
an :class:`Executor` runs any jittable ``program(params, images) -> {name: (B, ...) array}`` on
the devices of one process.

* **Two compiled shapes, never a third.** ``unit`` rows (``--batch-size``, 32) is the unit of
  the model's semantics, of padding and of error isolation. A GPU wants more rows per call
  than that, so a *device batch* of k x unit rows (``--device-batch-size``) is compiled beside
  it; a block's tail runs as unit-sized calls, padded. Calling an AOT executable with any
  other shape raises, so a ragged batch can never recompile silently.
* **Several devices** (an actor holding two GPUs; ``XLA_FLAGS=
  --xla_force_host_platform_device_count=N`` on CPU): each device batch is split along a 1-D
  ``data`` mesh (``NamedSharding``), parameters replicated once, at start.
* **In flight.** Up to ``depth`` device batches are dispatched ahead: the next batch is copied
  in and its program queued while the current one computes, and every result starts back at
  once (``copy_to_host_async``; not on the CPU, where results already live in host memory).
  The host blocks only when it needs the oldest result. The timings stay honest without
  serialising: ``dispatch`` is host time spent issuing work,
  ``wait`` host time blocked on results (near zero: the device is starved, the host is the
  bottleneck). :meth:`Executor.run_serial` keeps the serialised per-stage timing (transfer
  in, compute, transfer out, each waited for) for the seed table.
* **Canary.** At start the unit program runs on a fixed batch (all zeros) and keeps its
  outputs. After any failing call the canary runs again: if it fails or its outputs moved,
  the device or its runtime is broken (out of memory, an illegal address, a stuck context),
  not an image, and :class:`DeviceFailure` is raised for the caller to replace the process.
  Only when the canary passes is the failing batch bisected down to the images that fail.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.platforms import _first_line, error_text

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]  # program outputs, each (B, ...)
# Device batches dispatched ahead of the one the host waits for: two hide the copy in and
# the copy back behind compute; more only hold device memory.
DEPTH = 2
# Row-independence check: how far row 0's outputs may move when the other rows change
# (float32 convolutions may pick other algorithms per call on a GPU; a model that mixes
# rows, e.g. BatchNorm on batch statistics, moves them by far more).
MIXING_RTOL, MIXING_ATOL = 1e-3, 1e-4


class DeviceFailure(RuntimeError):
    """A call failed and the canary batch failed too: the device, not the data, is broken."""


class Executor:
    """``program`` compiled for this process's ``devices``; see the module docstring."""

    def __init__(
        self, program: Callable[[Any, Any], dict[str, Any]], params: Any,
        input_shape: tuple[int, ...], unit: int, device_batch: int | None = None,
        devices: list[Any] | None = None, depth: int = DEPTH, canary: bool = True,
    ):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.devices = list(devices or jax.local_devices()[:1])
        self.unit = unit
        self.device_batch = device_batch or unit
        if self.device_batch % unit:
            raise ValueError(f"device batch {self.device_batch} is not a multiple of {unit}")
        self.depth = depth
        # On the CPU a result is already in host memory and np.asarray reads it in place, so an
        # early copy back is a wasted memcpy; under JAX 0.11 it is worse: the copy runs on a
        # thread that np.asarray never joins, and a process that exits while one is pending
        # aborts ("terminate called without an active exception", 1 exit in 5 after a run).
        self._copy_ahead = self.devices[0].platform != "cpu"
        n = len(self.devices)
        mesh = Mesh(np.asarray(self.devices), ("data",))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._rows = NamedSharding(mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, self._replicated)  # once, not per batch
        start = time.perf_counter()
        self._programs: dict[int, Any] = {}
        for rows in dict.fromkeys((unit, self.device_batch)):
            # A batch that does not split evenly over the devices runs whole on each of them
            # (only a unit-sized tail can be such a batch: device batches are checked below).
            split = self._rows if rows % n == 0 else self._replicated
            x = jax.ShapeDtypeStruct((rows, *input_shape), jnp.uint8, sharding=split)
            jitted = jax.jit(program, in_shardings=(self._replicated, split), out_shardings=split)
            self._programs[rows] = (jitted.lower(self.params, x).compile(), split)
        if self.device_batch > unit and self.device_batch % n:
            raise ValueError(f"device batch {self.device_batch} does not split over {n} devices")
        self.compile_seconds = time.perf_counter() - start
        self.compilations = len(self._programs)
        self.seconds = {"dispatch": 0.0, "wait": 0.0}
        # When the device last gave a result (or an error): a watchdog's sign of life.
        self.last_result = time.monotonic()
        self._canary = np.zeros((unit, *input_shape), np.uint8)  # (unit, H, W, C)
        self._canary_out: Outputs = {}
        self.canary_seconds = 0.0  # the canary's first call: what a unit-sized call costs
        if canary:
            self.warm_up()

    def warm_up(self) -> None:
        """Run the canary batch and keep its outputs (the constructor does, unless asked not
        to: a caller that watches the device for hangs starts watching after compiling)."""
        start = time.perf_counter()
        self._canary_out = self._call(self._canary)
        self.canary_seconds = time.perf_counter() - start

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    def zeros(self, n: int) -> Outputs:
        """Outputs of ``n`` rows, all zeros (for rows that never reach the device)."""
        return {k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in self._canary_out.items()}

    def describe(self) -> str:
        kinds = sorted({getattr(d, "device_kind", d.platform) for d in self.devices})
        return f"{self.platform} ({len(self.devices)} x {', '.join(kinds)})"

    # -- running ------------------------------------------------------------------------

    def run(self, images: np.ndarray) -> Outputs:
        """(N, H, W, C) uint8, any N -> outputs (N, ...), with batches in flight; the first
        failing call's exception propagates (see :meth:`run_isolating`)."""
        parts = []
        for (lo, hi), result in self._pipelined(images):
            if isinstance(result, BaseException):
                raise result
            parts.append(result)
        return _concat(parts, self.zeros(len(images)))

    def run_isolating(self, images: np.ndarray) -> tuple[Outputs, list[str | None]]:
        """Like :meth:`run`, but a failing call is not the run's failure: once the canary
        proves the device sound, it is bisected down to the images that fail, which get an
        error (None for rows that are fine); so do rows whose outputs are NaN or Inf.
        Raises :class:`DeviceFailure` when the canary fails too."""
        n = len(images)
        out = self.zeros(n)
        errors: list[str | None] = [None] * n
        failed = []
        for (lo, hi), result in self._pipelined(images):
            if isinstance(result, BaseException):
                failed.append((lo, hi, result))
            else:
                _assign(out, slice(lo, hi), result)
        for lo, hi, first in failed:
            self.check_canary(first)
            self._bisect(images, lo, hi, out, errors)
        if "ok" in out:
            for i in np.flatnonzero(~out["ok"]):
                errors[i] = errors[i] or "model output is NaN or Inf for this image"
        return out, errors

    def run_serial(self, images: np.ndarray) -> tuple[Outputs, dict[str, float]]:
        """Profiling: unit-sized calls one after another, each stage waited for. Returns the
        outputs and seconds spent in transfer_in, compute and transfer_out."""
        import jax

        seconds = dict.fromkeys(("transfer_in", "compute", "transfer_out"), 0.0)
        compiled, sharding = self._programs[self.unit]
        parts = []
        for lo in range(0, len(images), self.unit):
            chunk = images[lo : lo + self.unit]
            t0 = time.perf_counter()
            x = jax.device_put(_pad(chunk, self.unit), sharding).block_until_ready()
            t1 = time.perf_counter()
            y = jax.block_until_ready(compiled(self.params, x))
            t2 = time.perf_counter()
            parts.append({k: np.asarray(v)[: len(chunk)] for k, v in y.items()})
            t3 = time.perf_counter()
            seconds["transfer_in"] += t1 - t0
            seconds["compute"] += t2 - t1
            seconds["transfer_out"] += t3 - t2
        return _concat(parts, self.zeros(len(images))), seconds

    # -- failures -------------------------------------------------------------------------

    def canary_ok(self) -> bool:
        """Does the canary batch still run and give the outputs it gave at start?"""
        try:
            now = self._call(self._canary)
        except Exception as e:  # whatever the runtime raises, the answer is "no"
            log.warning("Canary batch failed: %s", _first_line(e))
            return False
        return all(_same(now[k], v, 0.0, 0.0) for k, v in self._canary_out.items())

    def check_canary(self, cause: BaseException) -> None:
        """Raise :class:`DeviceFailure` (caused by ``cause``) unless the canary passes."""
        if not self.canary_ok():
            raise DeviceFailure(
                f"a call failed ({_first_line(cause)}) and so did the canary batch, which "
                f"ran at start: the device ({self.describe()}) is broken, not the data"
            ) from cause

    def mixing(self) -> float | None:
        """How far row 0's outputs move when the rest of its batch changes: None when they
        stay put (within MIXING_RTOL/ATOL), else the largest difference. A model that mixes
        rows (BatchNorm on batch statistics, dropout: training mode) makes the padding of a
        short batch change real results."""
        alone = self._canary.copy()
        alone[0] = 255  # row 0 white, the others black
        crowd = np.full_like(self._canary, 255)  # every row white
        a, b = self._call(alone), self._call(crowd)
        worst = 0.0
        for k, v in a.items():
            if v.dtype.kind != "f" or _same(v[:1], b[k][:1], MIXING_RTOL, MIXING_ATOL):
                continue  # labels may swap at a tie; their scores tell
            diff = np.abs(v[:1] - b[k][:1])
            worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any() else np.inf)
        return worst or None

    # -- internals ------------------------------------------------------------------------

    def _chunks(self, n: int) -> Iterator[tuple[int, int]]:
        lo = 0
        while n - lo >= self.device_batch:
            yield lo, lo + self.device_batch
            lo += self.device_batch
        while lo < n:  # the tail: unit-sized calls, the last one padded
            yield lo, min(n, lo + self.unit)
            lo += self.unit

    def _pipelined(self, images: np.ndarray) -> Iterator[tuple[tuple[int, int], Any]]:
        """Dispatch every chunk, at most ``depth`` ahead of the oldest, and yield each
        chunk's outputs (or the exception it raised) in order."""
        import jax

        inflight: deque = deque()
        for lo, hi in self._chunks(len(images)):
            t = time.perf_counter()
            rows = self.device_batch if hi - lo > self.unit else self.unit
            compiled, sharding = self._programs[rows]
            try:
                x = jax.device_put(_pad(images[lo:hi], rows), sharding)
                y = compiled(self.params, x)
                for leaf in y.values() if self._copy_ahead else ():
                    leaf.copy_to_host_async()
                inflight.append(((lo, hi), y))
            except Exception as e:  # dispatch can fail too (device out of memory)
                inflight.append(((lo, hi), e))
            self.seconds["dispatch"] += time.perf_counter() - t
            while len(inflight) > self.depth:
                yield self._collect(*inflight.popleft())
        while inflight:
            yield self._collect(*inflight.popleft())

    def _collect(self, span: tuple[int, int], y: Any) -> tuple[tuple[int, int], Any]:
        if isinstance(y, BaseException):
            return span, y
        t = time.perf_counter()
        try:
            result = {k: np.asarray(v)[: span[1] - span[0]] for k, v in y.items()}
        except Exception as e:  # the program failed on the device (or in a host callback)
            result = e
        self.last_result = time.monotonic()
        self.seconds["wait"] += time.perf_counter() - t
        return span, result

    def _call(self, images: np.ndarray) -> Outputs:
        """One unit-sized call, waited for: for canaries and bisection."""
        import jax

        compiled, sharding = self._programs[self.unit]
        try:
            y = compiled(self.params, jax.device_put(_pad(images, self.unit), sharding))
            return {k: np.asarray(v)[: len(images)] for k, v in y.items()}
        finally:
            self.last_result = time.monotonic()

    def _bisect(self, images, lo: int, hi: int, out: Outputs, errors: list) -> None:
        """Find the images of ``images[lo:hi]`` whose calls fail: unit-sized pieces, then
        halves, each padded to the unit shape (no recompile)."""
        pending = [(s, min(hi, s + self.unit)) for s in range(lo, hi, self.unit)][::-1]
        if len(pending) == 1 and hi - lo > 1:  # the failing call was this piece: halve it
            mid = (lo + hi) // 2
            pending = [(mid, hi), (lo, mid)]
        while pending:
            a, b = pending.pop()
            try:
                _assign(out, slice(a, b), self._call(images[a:b]))
            except Exception as e:  # a failing piece is split; a failing image is an error
                if b - a > 1:
                    mid = (a + b) // 2
                    pending += [(mid, b), (a, mid)]
                    continue
                self.check_canary(e)  # before condemning an image, clear the device again
                errors[a] = f"model failed on this image: {error_text(e)}"


def _pad(images: np.ndarray, rows: int) -> np.ndarray:
    """``images`` padded with zero rows to ``rows`` (a fresh array: the device may alias it
    while the call is in flight)."""
    if len(images) == rows:
        return np.ascontiguousarray(images)
    padded = np.zeros((rows, *images.shape[1:]), images.dtype)  # (rows, H, W, C)
    padded[: len(images)] = images
    return padded


def _assign(out: Outputs, rows: slice, result: Outputs) -> None:
    for k, v in result.items():
        out[k][rows] = v


def _concat(parts: list[Outputs], empty: Outputs) -> Outputs:
    if not parts:
        return empty
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _same(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> bool:
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
