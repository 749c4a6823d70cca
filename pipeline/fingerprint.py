"""What identifies the model that made a row, and when ``--resume`` may add rows to them.

A model is its weights, the computation it runs and its spec (input size, preprocessing,
class names). The ``model`` column holds :attr:`ModelIdentity.fingerprint`, a digest of all
three, computed once in the driver and handed to the actors (hashing a 1 GB model takes
seconds, and a worker with another JAX version would trace another program text).

The computation is hashed as the jaxpr of ``forward`` at batch 1: it names every op, shape
and literal the model runs, so an edit to any function ``apply`` calls changes it, and a
comment does not. But its text belongs to one JAX version: the same model under a newer JAX
may print another jaxpr. So the manifest also keeps a digest of the model's source files (the
factory's module and ``apply``'s) and the JAX version: :func:`resume_refusal` lets a run under
another JAX resume when weights, spec and source are unchanged, and the resumed rows keep the
manifest's fingerprint, so every row of the output names the same model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.model import Model


@dataclass(frozen=True)
class ModelIdentity:
    """Digests (sha256, hex) of what makes a model; ``fingerprint`` is the ``model`` column."""

    fingerprint: str  # 16 hex digits of weights + program + spec
    weights: str
    program: str
    spec: str
    source: str | None  # None: the code's files could not be read (a lambda in __main__...)
    jax: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def identify(model: Model) -> ModelIdentity:
    import jax

    weights = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        arr = np.asarray(leaf)
        weights.update(jax.tree_util.keystr(path).encode())
        weights.update(f"{arr.dtype}{arr.shape}".encode())
        weights.update(np.ascontiguousarray(arr).tobytes())
    from pipeline.model import _trace

    jaxpr = _trace(model, 1).jaxpr
    program = hashlib.sha256()
    # Host callbacks print as "<function f at 0x7f..>": drop addresses, which change per process.
    program.update(re.sub(r" at 0x[0-9a-fA-F]+", "", str(jaxpr)).encode())
    for const in jaxpr.consts:  # constants the code closes over, by value
        program.update(np.ascontiguousarray(np.asarray(const)).tobytes())
    spec = hashlib.sha256(json.dumps(model.spec.to_json(), sort_keys=True).encode())
    parts = [weights.hexdigest(), program.hexdigest(), spec.hexdigest()]
    return ModelIdentity(
        fingerprint=hashlib.sha256("".join(parts).encode()).hexdigest()[:16],
        weights=parts[0], program=parts[1], spec=parts[2],
        source=_source_digest(model), jax=jax.__version__,
    )


def resume_refusal(before: dict[str, Any] | None, now: ModelIdentity) -> str | None:
    """Why rows of ``now`` may not join rows made by ``before`` (a manifest's identity), or
    None when they may (the caller then keeps ``before["fingerprint"]`` for its rows)."""
    if before is None:
        return "the output's manifest does not describe its model in enough detail to compare"
    if before.get("fingerprint") == now.fingerprint:
        return None
    changed = [k for k in ("weights", "spec") if before.get(k) != getattr(now, k)]
    if changed:
        return f"the {' and '.join(changed)} differ"
    if before.get("jax") == now.jax:
        return "the computation differs: apply, or a function it calls, changed"
    if now.source is None or before.get("source") != now.source:
        return (f"JAX changed ({before.get('jax')} -> {now.jax}) and the model's source "
                "files differ or cannot be read, so the computation cannot be shown to be "
                "the same")
    return None


def _source_digest(model: Model) -> str | None:
    """sha256 of the source files of the factory's module and of ``apply``'s code."""
    files = set()
    modules = [model.factory.partition(":")[0]] if model.factory else []
    modules += [m for m in _modules_of(model.apply) if m]
    for name in modules:
        try:
            module = importlib.import_module(name)
            files.add(inspect.getsourcefile(module))
        except (ImportError, TypeError):  # __main__ of an interactive session, a builtin
            return None
    if not files or None in files:
        return None
    h = hashlib.sha256()
    for file in sorted(files):
        try:
            with open(file, "rb") as f:
                h.update(f.read())
        except OSError:
            return None
    return h.hexdigest()


def _modules_of(fn: Any) -> list[str | None]:
    """Modules holding the code of ``fn``: a partial's function, a bound method's class (for
    Flax's ``module.apply``, the user's module class, not Flax), or the function itself."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    owner = getattr(fn, "__self__", None)
    if owner is not None and not inspect.ismodule(owner):
        return [type(owner).__module__]
    return [getattr(fn, "__module__", None) or getattr(type(fn), "__module__", None)]
