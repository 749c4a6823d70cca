"""A test model factory: the bundled digits CNN with faults and a call counter built in.

Use it like a user's model: ``--model-fn poison_model:build --model OPTIONS.json`` (tests/ must
be on ``PYTHONPATH`` for Ray's workers, see :func:`worker_env`). OPTIONS.json holds:

- ``mode``: ``"raise"`` (the compiled call raises, through a host callback, when the batch holds
  a poison image), ``"nan"`` (the output row of a poison image is NaN), ``"exit"`` (the process
  dies on a poison image, as a segfault or an out-of-memory kill in a native library would) or
  ``"none"``.
- ``marker``: an image is poison when every one of its pixels has this uint8 value (a solid
  gray square; real digits never are).
- ``calls``: a file; every model call appends one line: process id, real images in the batch
  (padding rows are all zeros, which no digit image is), the Ray node id (``-`` outside Ray)
  and a short digest of each real image, in batch order (the same image always has the same
  digest, so a test can see which images a call held and whether one was computed again).
- ``delay``: seconds each model call sleeps, so a run lasts long enough to be interrupted.

Faults live inside the jitted function, as they would in a user's model: the pipeline cannot
tell them from a real failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.model import Model
from pipeline.models import digits_cnn

TESTS_DIR = str(Path(__file__).resolve().parent)
DEFAULTS = {"mode": "none", "marker": 77, "calls": None, "delay": 0.0}


def write_options(path: str | Path, **options) -> str:
    """Write OPTIONS.json for :func:`build`; returns its path."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown poison_model options {sorted(unknown)}")
    Path(path).write_text(json.dumps({**DEFAULTS, **options}))
    return str(path)


def worker_env() -> dict[str, str]:
    """Environment under which Ray workers (and subprocesses) can import this module."""
    parts = [TESTS_DIR, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(parts))}


class Call(NamedTuple):
    pid: int
    images: int  # real images in the batch
    node: str  # Ray node id, "-" outside Ray
    ids: tuple[str, ...] = ()  # a digest of each real image, in batch order


def read_calls(path: str | Path) -> list[Call]:
    """The model calls made so far, in order."""
    p = Path(path)
    lines = p.read_text().splitlines() if p.exists() else []
    calls = []
    for pid, n, node, *ids in (line.split() for line in lines):
        digests = tuple(ids[0].split(",")) if ids and ids[0] != "-" else ()
        calls.append(Call(int(pid), int(n), node, digests))
    return calls


def build(path: str | None = None) -> Model:
    """Model factory: the bundled CNN with the faults OPTIONS.json at ``path`` asks for."""
    options = {**DEFAULTS, **(json.loads(Path(path).read_text()) if path else {})}
    if options["mode"] not in ("none", "nan", "raise", "exit"):
        raise ValueError(
            f"poison_model mode must be none, nan, raise or exit, got {options['mode']!r}")
    base = digits_cnn.build()
    return Model(
        apply=_make_apply(base.apply, options, base.spec.scale), params=base.params,
        spec=base.spec, name=f"poison_{options['mode']}",
    )


def _make_apply(inner, options: dict, scale: float):
    import jax
    import jax.numpy as jnp

    mode, calls, delay = options["mode"], options["calls"], float(options["delay"])
    marker = options["marker"] * scale  # the marker value as the model sees it, in float32

    def host(poison: np.ndarray, real: np.ndarray, x: np.ndarray) -> None:
        if calls:
            ids = ",".join(_digest(row) for row in x[real]) or "-"
            line = f"{os.getpid()} {int(real.sum())} {_node_id()} {ids}\n"
            with open(calls, "a") as f:  # O_APPEND: one short write per call, safe across actors
                f.write(line)
        if delay:
            time.sleep(delay)
        if mode == "raise" and poison.any():
            raise ValueError(f"poison image in batch rows {np.flatnonzero(poison).tolist()}")
        if mode == "exit" and poison.any():
            os._exit(70)  # no exception, no cleanup: the process is simply gone

    def apply(params, x):  # x: (B, H, W, C) float32
        poison = jnp.all(jnp.abs(x - marker) < 1e-6, axis=(1, 2, 3))  # (B,) bool
        real = jnp.any(x != 0, axis=(1, 2, 3))  # (B,) bool: padding rows are all zero
        jax.debug.callback(host, poison, real, x)
        logits = inner(params, x)  # (B, classes)
        if mode == "nan":
            logits = jnp.where(poison[:, None], jnp.nan, logits)
        return logits

    return apply


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(image.tobytes(), digest_size=6).hexdigest()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
