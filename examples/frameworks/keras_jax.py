"""Keras 3 recipe: a Keras model on the JAX backend, run through ``stateless_call``.

    batch-infer run --model-fn examples.frameworks.keras_jax:build --input DIR --output OUT
    python -m examples.frameworks.keras_jax --output /tmp/k.weights.h5   # --model /tmp/k.weights.h5

- **The backend** is chosen once per process, when ``keras`` is first imported, from
  ``KERAS_BACKEND`` (default: TensorFlow). This module sets it before its own ``import keras``,
  so it holds in every process that imports the factory: the driver and each Ray worker, which
  import this module by name and so run this line first. If something imported keras earlier
  with another backend, the setting comes too late: the check below says so instead of failing
  later inside jit. (Exporting ``KERAS_BACKEND=jax`` in the shell, or in a Ray job's
  ``runtime_env={"env_vars": ...}``, works too.)
- **Variables are state**: calling ``model(x)`` reads Keras variables. The pipeline needs
  ``apply(params, x)`` with the arrays passed in, which is what
  ``model.stateless_call(trainable_values, non_trainable_values, x, training=False)`` does.
  ``params`` is ``(trainable_values, non_trainable_values)``; the second holds BatchNorm's moving
  mean and variance. ``training=False`` makes BatchNorm use them rather than the batch's
  statistics (``stateless_call`` defaults to ``training=False``; say it anyway).

Weights: ``model.save_weights("x.weights.h5")`` / ``model.load_weights(...)`` (HDF5 through
h5py, a Keras dependency; the name must end in ``.weights.h5``). Loading a file whose layers do
not match raises Keras's own error.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before `import keras`: see the module docstring

from pathlib import Path  # noqa: E402

import keras  # noqa: E402

import pipeline  # noqa: E402
from examples.frameworks.common import CLASS_NAMES, FEATURES, SEED, SPEC  # noqa: E402

if keras.backend.backend() != "jax":
    raise ImportError(
        f"keras was imported with the '{keras.backend.backend()}' backend before this module "
        "could select 'jax'; set KERAS_BACKEND=jax in the environment."
    )


def new(seed: int = SEED) -> keras.Model:
    """Seeded, untrained model. Each initializer gets its own seed, so every process that builds
    it (driver, Ray workers) gets the same weights without touching Keras's global seed."""
    layers = keras.layers
    f1, f2 = FEATURES

    def he(i: int) -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=seed * 1000 + i)

    return keras.Sequential([
        keras.Input(SPEC.shape),  # (B, 64, 64, 3): Keras is channels-last by default
        layers.Conv2D(f1, 3, padding="same", kernel_initializer=he(0), name="conv1"),
        layers.BatchNormalization(name="bn1"),
        layers.ReLU(),
        layers.AveragePooling2D(2),  # (B, 32, 32, 16)
        layers.Conv2D(f2, 3, strides=2, padding="same", kernel_initializer=he(1), name="conv2"),
        layers.BatchNormalization(name="bn2"),
        layers.ReLU(),
        layers.GlobalAveragePooling2D(),  # (B, 32)
        layers.Dense(len(CLASS_NAMES), kernel_initializer=he(2), name="head"),  # (B, 5) logits
    ], name="keras_cnn")


def save(model: keras.Model, path: str | Path) -> Path:
    """Weights (BatchNorm statistics included) to ``path``, which must end in ``.weights.h5``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(out)
    return out


def load(path: str | Path) -> keras.Model:
    """The model with the weights :func:`save` wrote."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Keras weights file at '{path}'")
    model = new()
    model.load_weights(path)
    return model


def build(path: str | None) -> pipeline.Model:
    """Model factory (``--model-fn``): ``path`` is a ``.weights.h5`` from :func:`save`, or None
    for the seeded weights."""
    model = load(path) if path is not None else new()
    params = (
        tuple(v.value for v in model.trainable_variables),  # kernels, biases, BN gamma/beta
        tuple(v.value for v in model.non_trainable_variables),  # BN moving mean/variance
    )

    def apply(params, x):
        trainable, non_trainable = params
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return logits  # the returned non-trainable values are unchanged in inference

    return pipeline.Model(apply=apply, params=params, spec=SPEC, name="keras_cnn")


if __name__ == "__main__":
    from examples.frameworks.common import weights_cli

    weights_cli("examples.frameworks.keras_jax", new, save)
