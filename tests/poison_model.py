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
  and the Ray node id (``-`` outside Ray) and a short digest of each real image, in batch
  order (the same image always has the same digest, so a test can see which images a call
  held and whether one was computed again). Padding rows are all black, and the pipeline's
  own start-up checks (the canary batch, the row-independence check: see pipeline/device.py)
  use all-black and all-white images; no digit image is either, so neither counts as real.
- ``delay``: seconds each model call sleeps, so a run lasts long enough to be interrupted.
- ``break_after``: with mode ``"break"``, every call of a process after its first
  ``break_after`` calls raises, as a GPU does once its context is lost (an illegal address,
  ECC errors): nothing is wrong with the images, and the canary batch fails too. Only the
  first ``breaking_processes`` processes break (``breaks``: a directory where each leaves a
  file), so a replacement can finish the work; -1: every process breaks.
- ``"hang"``: a call whose batch holds a poison image never returns, as a model caught in an
  endless loop on one input. ``"stuck"``: after its first ``break_after`` calls, a process's
  device hangs, as a GPU context that stops completing work does: that call and every later
  call, in every process, never return (the device stays stuck: ``breaks`` holds a file
  saying so) unless ``breaking_processes`` is 1, when only the first process's device
  sticks and a replacement finds it sound again.

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
DEFAULTS = {"mode": "none", "marker": 77, "calls": None, "delay": 0.0, "break_after": 0,
            "breaking_processes": -1, "breaks": None}


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
    modes = ("none", "nan", "raise", "exit", "break", "hang", "stuck")
    if options["mode"] not in modes:
        raise ValueError(f"poison_model mode must be one of {modes}, got {options['mode']!r}")
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

    made = [0]  # calls made by this process
    breaking = [None]  # does this process break (decided at its first call)

    def broken() -> bool:
        made[0] += 1
        if mode != "break" or made[0] <= options["break_after"]:
            return False
        if breaking[0] is None:
            broke = Path(options["breaks"])
            broke.mkdir(exist_ok=True)
            limit = options["breaking_processes"]
            breaking[0] = limit < 0 or len(list(broke.iterdir())) < limit
            if breaking[0]:
                (broke / str(os.getpid())).touch()
        return breaking[0]

    def stuck() -> bool:  # after broken(), which counts the call
        if mode != "stuck":
            return False
        flag = Path(options["breaks"]) / "stuck"
        if flag.exists():
            return options["breaking_processes"] != 1 or flag.read_text() == str(os.getpid())
        if made[0] > options["break_after"]:
            flag.parent.mkdir(exist_ok=True)
            flag.write_text(str(os.getpid()))
            return True
        return False

    def hang() -> None:
        while True:
            time.sleep(60)

    def host(poison: np.ndarray, real: np.ndarray, x: np.ndarray) -> None:
        if broken():
            raise RuntimeError("simulated device failure: CUDA_ERROR_ILLEGAL_ADDRESS")
        if stuck():
            hang()
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
        if mode == "hang" and poison.any():
            hang()

    def apply(params, x):  # x: (B, H, W, C) float32
        poison = jnp.all(jnp.abs(x - marker) < 1e-6, axis=(1, 2, 3))  # (B,) bool
        black = jnp.all(x == 0, axis=(1, 2, 3))  # (B,) bool: padding, canary
        white = jnp.all(jnp.abs(x - 255 * scale) < 1e-6, axis=(1, 2, 3))  # start-up check
        real = ~(black | white)  # (B,) bool
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
