"""GPU work kept out of the bench's own process.

JAX preallocates 75% of a GPU's memory in the first process that starts CUDA. The bench's
process (and ``gpu-check``'s) must leave the GPU to its contestants, so it never starts
CUDA: :func:`probe` asks JAX in a short child process what it sees, and :func:`in_child`
runs a measurement that needs the GPU (the seed table, the model's cost, the sweep, the
model stage) in a child of its own, which returns JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from typing import Any

# The child prints this, then its result as JSON on one line.
_MARK = "@@bench-result@@ "

_PROBE = r"""
import json, jax
devices = jax.devices()
out = []
for d in devices:
    info = {"id": d.id, "platform": d.platform, "kind": getattr(d, "device_kind", d.platform)}
    try:
        stats = d.memory_stats() or {}
        limit = stats.get("bytes_limit")
        info["memory_gb"] = round(limit / 2**30, 1) if limit else None
    except Exception:  # not every backend reports memory
        info["memory_gb"] = None
    out.append(info)
print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(), "devices": out}))
"""


@contextlib.contextmanager
def spawning():
    """Around starting a child process: JAX warns at every fork that a forked JAX may
    deadlock, but subprocess execs at once and the child runs none of our JAX threads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                category=RuntimeWarning)
        yield


def probe(env: dict[str, str] | None = None, timeout: float = 180) -> dict[str, Any]:
    """What JAX sees on this machine, asked in a child process: ``gpu`` (bool), ``platform``,
    ``count``, ``kinds``, ``devices``, ``jax``; ``error`` when JAX could not start."""
    child_env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **(env or {})}
    try:
        with spawning():
            proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True,
                                  text=True, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _nothing(f"JAX did not answer within {timeout:.0f} s")
    if proc.returncode != 0:
        return _nothing(" ".join(proc.stderr.strip().splitlines()[-1:]) or "JAX failed to start")
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    devices = seen["devices"]
    gpus = [d for d in devices if d["platform"] == "gpu"]
    chosen = gpus or devices
    return {"gpu": bool(gpus), "platform": chosen[0]["platform"] if chosen else None,
            "count": len(chosen), "kinds": sorted({d["kind"] for d in chosen}),
            "devices": devices, "jax": seen["jax"], "backend": seen["backend"], "error": None}


def _nothing(error: str) -> dict[str, Any]:
    return {"gpu": False, "platform": None, "count": 0, "kinds": [], "devices": [],
            "jax": None, "backend": None, "error": error}


def nvidia_smi() -> list[dict[str, str]] | None:
    """The cards as the driver names them (name, memory, driver), or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    fields = ("name", "memory.total", "driver_version")
    proc = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return [{"error": proc.stderr.strip()[-300:]}]
    return [dict(zip(fields, (v.strip() for v in line.split(","))))
            for line in proc.stdout.strip().splitlines()]


def in_child(target: str, env: dict[str, str] | None = None, timeout: float | None = None,
             **kwargs: Any) -> Any:
    """Call ``"module:function"(**kwargs)`` in a fresh Python process and return what it
    returns; both must be JSON. ``env`` is added to this process's environment."""
    cmd = [sys.executable, "-m", "pipeline.bench", "--call", target, json.dumps(kwargs)]
    with spawning():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench child '{target}' failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(_MARK):])


def call_here(target: str, arguments: str) -> None:
    """The child's side of :func:`in_child`."""
    module, _, name = target.partition(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(arguments))
    print(_MARK + json.dumps(result), flush=True)
