"""The model contract: what the pipeline needs from any JAX model.

A model is a pure ``apply(params, x)`` over a float32 NHWC batch, its params, and a
:class:`ModelSpec` saying what input it wants and what it returns. The bundled digits CNN
(:mod:`pipeline.models.digits_cnn`) and user models (``--model-fn module:build``) both arrive
here as a :class:`Model`; the pipeline never knows which one it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

DEFAULT_MODEL_FN = "pipeline.models.digits_cnn:build"
OutputKind = Literal["classification", "embedding"]


class ModelError(ValueError):
    """A model cannot be loaded or does not honour the contract; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model takes and returns.

    Pixels reach ``apply`` as ``uint8 * scale + offset`` in float32, shape
    ``(batch, height, width, channels)``; channels is 1 (grayscale) or 3 (RGB).
    """

    height: int
    width: int
    channels: int
    class_names: tuple[str, ...] = ()
    output: OutputKind = "classification"
    embedding_dim: int | None = None
    scale: float = 1.0 / 255.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if min(self.height, self.width) < 1:
            problems.append(f"height/width must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.output == "classification" and not self.class_names:
            problems.append("a classification model needs class_names")
        if self.output == "embedding" and not (self.embedding_dim or 0) > 0:
            problems.append("an embedding model needs a positive embedding_dim")
        if self.output not in ("classification", "embedding"):
            problems.append(f"output must be 'classification' or 'embedding', got {self.output!r}")
        if problems:
            raise ModelError("Invalid model spec: " + "; ".join(problems) + ".")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def output_dim(self) -> int:
        return len(self.class_names) if self.output == "classification" else int(self.embedding_dim)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Model:
    """A loaded model: ``apply``, its params and spec, plus a content fingerprint.

    ``predict`` works without Ray; the pipeline's actors compile the same forward function.
    """

    apply: Callable[[Any, Any], Any]
    params: Any
    spec: ModelSpec
    name: str = "model"
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.apply, self.params, self.spec)

    def forward(self, params: Any, images: Any) -> Any:
        """uint8 (B, H, W, C) -> float32 (B, D): probabilities or embeddings. Jittable."""
        import jax
        import jax.numpy as jnp

        x = images.astype(jnp.float32) * self.spec.scale + self.spec.offset
        out = self.apply(params, x).astype(jnp.float32)  # (B, D)
        if self.spec.output == "classification":
            out = jax.nn.softmax(out, axis=-1)
        return out

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Run the model on uint8 NHWC images of the spec's size; returns (N, D) float32."""
        images = np.asarray(images)
        if images.ndim == 3 and self.spec.channels == 1:
            images = images[..., None]
        if images.shape[1:] != self.spec.shape or images.dtype != np.uint8:
            raise ValueError(
                f"predict expects uint8 images of shape (N, {self.spec.height}, "
                f"{self.spec.width}, {self.spec.channels}), got {images.dtype} {images.shape}."
            )
        runner = self._runner(batch_size)
        return np.concatenate(
            [runner.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            or [np.zeros((0, self.spec.output_dim), np.float32)]
        )

    def _runner(self, batch_size: int):
        from pipeline.infer import BatchRunner

        cache = self.__dict__.setdefault("_runners", {})
        if batch_size not in cache:
            cache[batch_size] = BatchRunner(self, batch_size)
        return cache[batch_size]


def fingerprint(apply: Callable, params: Any, spec: ModelSpec) -> str:
    """sha256 of the weights, the apply code and the preprocessing spec (first 16 hex digits)."""
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(_code_identity(apply).encode())
    h.update(json.dumps(spec.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _code_identity(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return repr(code.co_code) if code is not None else getattr(fn, "__qualname__", repr(fn))


def load_model(path: str | Path | None = None, model_fn: str | None = None) -> Model:
    """Load a model through its factory (default: the bundled digits CNN).

    ``model_fn`` is ``"package.module:function"``; the function is called as ``fn(path)``
    and must return a :class:`Model`. ``path`` is passed through (``None`` means the factory's
    own default weights).
    """
    spec = model_fn or DEFAULT_MODEL_FN
    factory = import_factory(spec)
    try:
        model = factory(str(path) if path is not None else None)
    except ModelError:
        raise
    except FileNotFoundError as e:
        raise ModelError(f"Model factory '{spec}' could not find its weights: {e}") from e
    except Exception as e:
        raise ModelError(f"Model factory '{spec}' failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, Model):
        raise ModelError(
            f"Model factory '{spec}' returned {type(model).__name__}, expected pipeline.Model "
            "(apply, params, spec)."
        )
    if not callable(model.apply):
        raise ModelError(f"Model factory '{spec}' returned a Model whose apply is not callable.")
    return model


def import_factory(spec: str) -> Callable[[str | None], Model]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"Model factory '{spec}' must look like 'package.module:function'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"Model factory '{spec}' cannot be imported: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"Model factory '{spec}': module '{module_name}' has no function '{attr}'.")
    return factory
