"""Which accelerator a process computes on: chosen before JAX starts, and insisted on.

The driver pins its JAX to the CPU (:func:`pin_to_cpu`); each actor pins JAX to its platform
(:func:`configure`) and takes only devices of that platform (:func:`select_devices`): an
actor that reserved a GPU and finds none raises :class:`DeviceError` instead of computing on
the CPU. Each process also gets the persistent compilation cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """No usable device of the requested platform in this process; the message says why."""



def configure(platform: str | None) -> None:
    """Choose the JAX platform and the persistent compilation cache, before JAX starts here.

    ``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"`` pin JAX to that platform; ``"gpu"`` lets JAX
    find CUDA or ROCm (:func:`select_devices` then insists on a GPU). Setting it in-process
    rather than through a runtime_env lets Ray hand the actor a prestarted worker process
    (a runtime_env needs a fresh one: about a second more per actor).
    """
    import jax

    if platform and platform != "gpu":
        jax.config.update("jax_platforms", platform)
    _use_compilation_cache()


def _use_compilation_cache() -> None:
    """The cache saves the XLA compile (~0.4 s for the digits CNN, seconds for a ResNet) on
    every actor start after the first. It lives in the user's own 0700 directory, because
    whoever can write it can run code in our actors."""
    import jax

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


def pin_to_cpu() -> bool:
    """Keep this process's JAX on the CPU, if JAX has not started here yet; True if pinned.

    The driver only traces and lowers the model: on a GPU machine, letting its JAX start CUDA
    would take 75% of GPU 0 (JAX preallocates) before any actor starts, and a local
    ``--gpus-per-actor 1`` run would starve its own actor.
    """
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        platforms = {d.platform for d in jax.devices()}
        if platforms - {"cpu"}:
            log.warning(
                "JAX in this process already holds %s; actors on this machine get less of it",
                ", ".join(sorted(platforms - {"cpu"})),
            )
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def select_devices(platform: str) -> list[Any]:
    """This process's devices of ``platform`` ("gpu" accepts CUDA or ROCm); DeviceError when
    there are none, rather than computing somewhere else."""
    import jax

    try:
        devices = jax.local_devices()
    except RuntimeError as e:  # the platform's plugin is missing or failed to start
        raise DeviceError(f"JAX cannot start platform '{platform}': {_first_line(e)}") from e
    want = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    mine = [d for d in devices if d.platform == want]
    if not mine:
        found = ", ".join(sorted({d.platform for d in devices})) or "nothing"
        raise DeviceError(f"JAX finds no {platform} device here, only {found}")
    return mine


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).strip().split("\n\n")[0].split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def error_text(e: BaseException) -> str:
    """An exception as one line: its type and whole message."""
    message = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {message}"
