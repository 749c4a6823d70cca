"""Flax Linen recipe: ``module.apply(variables, x, train=False)`` with ``batch_stats``.

    batch-infer run --model-fn examples.frameworks.flax_linen:build --input DIR --output OUT
    python -m examples.frameworks.flax_linen --output /tmp/linen.npz   # then --model /tmp/linen.npz

A Linen module is already a pure function of its variables, so the recipe is
``apply=functools.partial(module.apply, train=False)`` and ``params=variables``, where
``variables`` holds both collections, ``{"params": ..., "batch_stats": ...}``. ``train=False``
turns into ``BatchNorm(use_running_average=True)``: each image is normalised with the stored
statistics, not with those of the batch it happens to share with other images (and padding).
No ``mutable=`` is needed: nothing is updated in inference.

Weights: ``flatten_dict(variables, sep="/")`` is a flat dict of arrays, saved as an ``.npz`` (no
pickle). Loading checks it against ``jax.eval_shape(module.init, ...)``, which allocates nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

import pipeline
from examples.frameworks.common import CLASS_NAMES, FEATURES, SEED, SPEC, load_npz, save_npz


class Net(nn.Module):
    num_classes: int = len(CLASS_NAMES)

    @nn.compact
    def __call__(self, x, train: bool = False):  # (B, 64, 64, 3) float32
        f1, f2 = FEATURES
        norm = functools.partial(nn.BatchNorm, use_running_average=not train)
        x = nn.relu(norm(name="bn1")(nn.Conv(f1, (3, 3), name="conv1")(x)))  # (B, 64, 64, 16)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # (B, 32, 32, 16)
        x = nn.relu(norm(name="bn2")(nn.Conv(f2, (3, 3), strides=2, name="conv2")(x)))
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))  # (B, 5) logits


NET = Net()


def new(seed: int = SEED) -> dict:
    """Seeded, untrained ``{"params", "batch_stats"}``."""
    return NET.init(jax.random.key(seed), jnp.zeros((1, *SPEC.shape), jnp.float32))


def save(variables: dict, path: str | Path) -> Path:
    """Both collections to an ``.npz`` of ``"params/conv1/kernel"``-style arrays."""
    return save_npz(path, flatten_dict(variables, sep="/"))


def load(path: str | Path) -> dict:
    """The variables :func:`save` wrote."""
    shapes = flatten_dict(jax.eval_shape(new), sep="/")
    flat = load_npz(path, {k: v.shape for k, v in shapes.items()})
    return unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def build(path: str | None) -> pipeline.Model:
    """Model factory (``--model-fn``): ``path`` is an ``.npz`` from :func:`save`, or None for
    the seeded weights."""
    variables = load(path) if path is not None else new()
    apply = functools.partial(NET.apply, train=False)  # BatchNorm on its running statistics
    return pipeline.Model(apply=apply, params=variables, spec=SPEC, name="flax_linen_cnn")


if __name__ == "__main__":
    from examples.frameworks.common import weights_cli

    weights_cli("examples.frameworks.flax_linen", new, save)
