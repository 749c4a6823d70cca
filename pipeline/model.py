"""The model contract: what the pipeline needs from any JAX model.

Bring your own model by writing a *factory*, a function ``build(path: str | None) -> Model`` in
a module the pipeline can import, and pass it as ``batch-infer run --model-fn my_module:build``
(``pipeline.run(..., model_fn="my_module:build")`` from Python)::

    import numpy as np
    import pipeline

    def apply(params, x):                          # (B, H, W, C) float32, already normalised
        pooled = x.mean(axis=(1, 2))               # (B, C)
        return pooled @ params["dense"]["kernel"] + params["dense"]["bias"]  # (B, D) logits

    def build(path: str | None) -> pipeline.Model:
        params = load_my_weights(path)             # any pytree of arrays
        spec = pipeline.ModelSpec(height=64, width=64, channels=3, class_names=("cat", "dog"),
                                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        return pipeline.Model(apply=apply, params=params, spec=spec, name="my_model")

The factory runs in the driver, which checks the model before any image is read, and once in
each inference actor; ``path`` is ``--model`` (None when not given). ``params`` may be any
pytree of arrays (a Flax ``variables`` dict works as is, with ``apply=module.apply``) and
``apply`` any jittable function of ``(params, x)``; each actor compiles it once for
``(batch_size, H, W, C)``. Images are decoded and brought to the spec's size as its
``resize`` says (squash, center crop or pad), as uint8 (grayscale or RGB); ``apply``
receives ``(uint8 * scale + offset - mean) / std`` in float32. A classification model
returns logits (the pipeline applies softmax, and keeps the logits on request); an embedding
model (``output="embedding"``, ``embedding_dim=D``) returns its vectors.

The bundled digits CNN (:mod:`pipeline.models.digits_cnn`) is such a factory, and the default.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline.flops import matmul_flops
from pipeline.spec import ModelError, ModelSpec

if TYPE_CHECKING:
    from pipeline.fingerprint import ModelIdentity

DEFAULT_MODEL_FN = "pipeline.models.digits_cnn:build"


@dataclass
class Model:
    """A model: ``apply(params, x) -> (B, D)``, its params and spec, and a name for messages.

    ``predict`` works without Ray; the pipeline's actors compile the same :meth:`forward`.
    :attr:`fingerprint` identifies weights, computation and preprocessing.
    """

    apply: Callable[[Any, Any], Any]
    params: Any
    spec: ModelSpec
    name: str = "model"
    factory: str = ""  # "module:function" that built it; set by load_model, used in messages

    @property
    def source(self) -> str:
        """How messages name this model: its factory when known."""
        return f"Model factory '{self.factory}'" if self.factory else f"Model '{self.name}'"

    # Which parameters stay float32 under --compute-dtype bfloat16 (called with each leaf's
    # path, e.g. "['bn1']['scale']"); None: normalisation scales and statistics (see
    # keeps_float32). A model that knows better says so here.
    float32_params: Callable[[str], bool] | None = None
    # Set by load_model: the version of the weights it loaded (pipeline.model_files.resolve);
    # the actors load only that same version, or stop the run.
    weights: str = ""

    @functools.cached_property
    def identity(self) -> ModelIdentity:
        """Digests of the weights, the traced program, the spec and the model's source code."""
        from pipeline.fingerprint import identify

        return identify(self)

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the weights, the traced computation and the spec: the
        ``model`` column. The driver computes it once and hands it to the actors."""
        return self.identity.fingerprint

    def raw(self, params: Any, images: Any, compute_dtype: str = "float32") -> Any:
        """uint8 (B, H, W, C) -> float32 (B, D): logits or embeddings, as ``apply`` returns
        them. Jittable. ``compute_dtype="bfloat16"`` casts the normalised input; pass params
        from :meth:`compute_params` (cast once, not on every call)."""
        import jax.numpy as jnp

        x = self.spec.normalise(images)  # (B, H, W, C) float32
        if compute_dtype != "float32":
            x = x.astype(jnp.dtype(compute_dtype))
        out = self.apply(params, x)
        if isinstance(out, (tuple, list, dict)) or not hasattr(out, "shape"):
            raise ModelError(f"apply returned a {type(out).__name__}, expected one (batch, D) array")
        return out.astype(jnp.float32)  # (B, D)

    def forward(self, params: Any, images: Any, compute_dtype: str = "float32") -> Any:
        """uint8 (B, H, W, C) -> float32 (B, D): probabilities or embeddings. Jittable."""
        out = self.raw(params, images, compute_dtype)
        return _softmax(out) if self.spec.output == "classification" else out

    def program(
        self, top_k: int | None = None, logits: bool = False, compute_dtype: str = "float32"
    ) -> Callable[[Any, Any], dict[str, Any]]:
        """The function each actor compiles: ``(params, uint8 images) -> {name: (B, ...)}``.

        Always ``ok`` (B,) bool, False where an output is NaN or Inf. An embedding model
        adds ``embedding`` (B, D). A classification model adds ``topk_scores`` (B, k) and
        ``topk_labels`` (B, k) int32, computed on the device (``lax.top_k``, lower index
        first on ties, as a stable argsort), so only k numbers per row come back; with
        ``top_k=None`` it adds every probability as ``scores`` (B, D) instead. ``logits``
        adds the raw ``logits`` (B, D).
        """
        import jax.numpy as jnp
        from jax import lax

        classify = self.spec.output == "classification"
        k = min(top_k, self.spec.output_dim) if top_k else None

        def run(params: Any, images: Any) -> dict[str, Any]:
            out = self.raw(params, images, compute_dtype)  # (B, D) float32
            result = {"ok": jnp.isfinite(out).all(axis=-1)}  # (B,) bool
            if not classify:
                return {**result, "embedding": out}
            probs = _softmax(out)  # (B, D)
            if k:
                scores, labels = lax.top_k(probs, k)  # (B, k), (B, k)
                result.update(topk_scores=scores, topk_labels=labels.astype(jnp.int32))
            else:
                result["scores"] = probs
            if logits:
                result["logits"] = out
            return result

        return run

    def compute_params(self, compute_dtype: str = "float32") -> Any:
        """``params`` for a program computing in ``compute_dtype``: floating leaves cast once,
        here, except those :attr:`float32_params` keeps (default: normalisation scales and
        statistics, see :func:`keeps_float32`). The fingerprint stays the stored weights'."""
        import jax
        import jax.numpy as jnp

        if compute_dtype == "float32":
            return self.params
        dtype = jnp.dtype(compute_dtype)
        keep = self.float32_params or keeps_float32

        def cast(path, leaf):
            leaf = np.asarray(leaf)
            if not np.issubdtype(leaf.dtype, np.floating) or keep(jax.tree_util.keystr(path)):
                return leaf
            return leaf.astype(dtype)

        return jax.tree_util.tree_map_with_path(cast, self.params)

    def compute_params_shapes(self, compute_dtype: str = "float32") -> Any:
        """What :meth:`compute_params` returns, as ``ShapeDtypeStruct`` leaves (no copy)."""
        import jax
        import jax.numpy as jnp

        keep = self.float32_params or keeps_float32

        def struct(path, leaf):
            dtype = np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
            if compute_dtype != "float32" and np.issubdtype(dtype, np.floating):
                dtype = dtype if keep(jax.tree_util.keystr(path)) else jnp.dtype(compute_dtype)
            return jax.ShapeDtypeStruct(np.shape(leaf), dtype)

        return jax.tree_util.tree_map_with_path(struct, self.params)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Run the model on uint8 NHWC images of the spec's size; returns (N, D) float32:
        probabilities or embeddings."""
        images = np.asarray(images)
        if images.ndim == 3 and self.spec.channels == 1:
            images = images[..., None]
        if images.shape[1:] != self.spec.shape or images.dtype != np.uint8:
            raise ValueError(
                f"predict expects uint8 images of shape (N, {self.spec.height}, "
                f"{self.spec.width}, {self.spec.channels}), got {images.dtype} {images.shape}."
            )
        out = self.executor(batch_size).run(images)
        return out["scores" if self.spec.output == "classification" else "embedding"]

    def executor(self, batch_size: int = 32):
        """A :class:`pipeline.device.Executor` of all probabilities (or embeddings), on this
        process's default device, compiled once per batch size."""
        from pipeline.device import Executor

        cache = self.__dict__.setdefault("_executors", {})
        if batch_size not in cache:
            cache[batch_size] = Executor(self.program(), self.params, self.spec.shape, batch_size)
        return cache[batch_size]


def keeps_float32(path: str) -> bool:
    """Does a parameter at ``path`` stay float32 under bfloat16 compute? Yes for normalisation
    layers' scales, offsets and statistics (Flax ``BatchNorm_0``/``LayerNorm``, batch_stats,
    torch-style ``bn1``/``running_var``, ``ln_1``): bfloat16's 8 bits of mantissa would move
    a variance of 1e-4 by 1%, and they are a few numbers per channel."""
    words = [w for w in re.split(r"[^a-z0-9]+", path.lower()) if w]
    return any(
        "norm" in w or re.fullmatch(r"(bn|ln)\d*|mean|var|variance|stats|moving", w)
        for w in words
    )


def _softmax(out: Any) -> Any:
    import jax
    import jax.numpy as jnp

    probs = jax.nn.softmax(out, axis=-1)  # (B, D)
    # XLA:CPU's vectorised exp turns NaN into finite garbage, so a broken logit row would come
    # out as a plausible distribution; keep it NaN so it is flagged.
    return jnp.where(jnp.isfinite(out).all(axis=-1, keepdims=True), probs, jnp.nan)


def check_model(
    model: Model, batch_size: int, platform: str = "cpu", compute_dtype: str = "float32"
) -> float | None:
    """Trace ``model.forward`` for ``(batch_size, H, W, C)`` uint8 with no data, and lower
    the program for ``platform`` (the actors', which need not be this process's: lowering
    for "cuda" works on a CPU-only driver, and starts no GPU).

    Returns XLA's estimate of the FLOPs per image (None where the platform gives none);
    raises one-line :class:`ModelError` naming the factory when ``apply`` fails for the
    declared input, returns the wrong shape or cannot be lowered.
    """
    import jax
    import jax.numpy as jnp

    traced = _trace(model, batch_size)
    got, expected = tuple(traced.out_info.shape), (batch_size, model.spec.output_dim)
    if got != expected:
        what = (f"{expected[1]} class names" if model.spec.output == "classification"
                else f"embedding_dim={expected[1]}")
        raise ModelError(
            f"{model.source}: apply returns shape {got} for a batch of {batch_size}, but its "
            f"spec declares {what}, so {expected} was expected."
        )
    target = "cuda" if platform == "gpu" else platform
    x = jax.ShapeDtypeStruct((batch_size, *model.spec.shape), jnp.uint8)
    params = model.compute_params_shapes(compute_dtype)
    try:
        program = jax.jit(model.program(top_k=1, compute_dtype=compute_dtype))
        lowered = program.trace(params, x).lower(lowering_platforms=(target,))
    except Exception as e:
        raise ModelError(
            f"{model.source}: apply cannot be lowered to XLA for {target} and a batch of "
            f"{batch_size}: {_one_line(e)}"
        ) from e
    try:
        cost = lowered.cost_analysis()
    except Exception:  # an estimate only: some platforms have none before compiling
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    # XLA counts a loop's body once; matmul_flops multiplies scans out (see pipeline.flops).
    flops = max(float((cost or {}).get("flops") or 0.0), matmul_flops(traced.jaxpr))
    return flops / batch_size if flops > 0 else None


def _trace(model: Model, batch_size: int) -> Any:
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((batch_size, *model.spec.shape), jnp.uint8)
    try:
        return jax.jit(model.forward).trace(model.params, x)
    except Exception as e:  # a user's apply can raise anything while tracing
        raise ModelError(
            f"{model.source}: apply fails for its declared input {x.shape} "
            f"(float32 after normalising): {_one_line(e)}"
        ) from e


def load_model(path: str | os.PathLike | None = None, model_fn: str | None = None, *,
               weights: str | None = None) -> Model:
    """Load a model through its factory (default: the bundled digits CNN).

    ``model_fn`` is ``"package.module:function"``; the function is called as ``fn(path)``
    and must return a :class:`Model`. ``path`` is passed through (``None`` means the factory's
    own default weights), except a URI (``s3://...``), whose file or folder is copied once to
    this machine's cache and passed as that copy (:mod:`pipeline.model_files`); ``weights``,
    the driver's :attr:`Model.weights`, refuses weights that changed since. Every failure is a
    :class:`ModelError` naming the factory.
    """
    from pipeline.model_files import check_copy, local_version, resolve
    from pipeline.read import is_uri

    spec = model_fn or DEFAULT_MODEL_FN
    factory = import_factory(spec)
    given = os.fspath(path) if path is not None else None
    local, key = resolve(given, weights or None)
    try:
        model = factory(local)
    except ModelError as e:
        raise ModelError(f"Model factory '{spec}': {e}") from e
    except FileNotFoundError as e:
        raise ModelError(f"Model factory '{spec}' could not find its weights: {e}") from e
    except Exception as e:  # user code: anything it raises is reported as the factory's failure
        raise ModelError(f"Model factory '{spec}' failed: {_one_line(e)}") from e
    if not isinstance(model, Model):
        raise ModelError(
            f"Model factory '{spec}' returned {type(model).__name__}, expected pipeline.Model "
            "(apply, params, spec)."
        )
    if not isinstance(model.spec, ModelSpec):
        raise ModelError(
            f"Model factory '{spec}' returned a Model whose spec is {type(model.spec).__name__}, "
            "expected pipeline.ModelSpec."
        )
    if not callable(model.apply):
        raise ModelError(f"Model factory '{spec}' returned a Model whose apply is not callable.")
    if weights is None and given and not is_uri(given):  # the driver: what its factory left
        key = local_version(given)
    elif weights:  # an actor: on another machine, a copy of the same bytes
        check_copy(given, weights)
    model.factory, model.weights = spec, key
    return model


def import_factory(spec: str) -> Callable[[str | None], Model]:
    """Import ``"package.module:function"``; the current directory is searched last, like
    ``python -m`` does and like Ray does for its local workers."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"Model factory '{spec}' must look like 'package.module:function'.")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(
            f"Model factory '{spec}' cannot be imported: {_one_line(e)} (run from the directory "
            "that holds it, set PYTHONPATH, or ship it to a cluster with the job's --working-dir)."
        ) from e
    except Exception as e:  # the module itself raised (SyntaxError, a failing import-time call)
        raise ModelError(f"Model factory '{spec}' cannot be imported: {_one_line(e)}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"Model factory '{spec}': module '{module_name}' has no function '{attr}'.")
    try:
        inspect.signature(factory).bind(None)
    except TypeError:
        raise ModelError(
            f"Model factory '{spec}' must take one argument (the --model path, or None); its "
            f"signature is {inspect.signature(factory)}."
        ) from None
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    return factory


def _one_line(e: BaseException) -> str:
    """Exception type and the first paragraph of its message, on one line (JAX's messages run
    to many paragraphs; the first says what is wrong)."""
    first = str(e).strip().split("\n\n")[0]
    text = " ".join(first.split())
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
