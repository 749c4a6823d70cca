"""Flax NNX recipe: a stateful ``nnx.Module`` as the pipeline's ``(params, x)`` function.

    batch-infer run --model-fn examples.frameworks.flax_nnx:build --input DIR --output OUT
    python -m examples.frameworks.flax_nnx --output /tmp/nnx.npz   # then --model /tmp/nnx.npz

The recipe is three lines of :func:`build`:

1. ``model.eval()`` before splitting. It sets ``use_running_average=True`` on every BatchNorm
   (``deterministic=True`` on Dropout). Those are static attributes: they travel in the graphdef,
   so they must be set before the split. Left in training mode, BatchNorm normalises each image
   with the statistics of its whole batch, padding rows included.
2. ``graphdef, state = nnx.split(model)``: ``state`` (params and BatchNorm statistics) is a pytree
   of arrays, which the pipeline moves to the device and fingerprints; the graphdef is structure.
3. ``apply = lambda state, x: nnx.merge(graphdef, state)(x)``: the merge runs while jit traces,
   not per batch.

Weights: ``nnx.to_pure_dict(nnx.state(model))`` is a nested dict of arrays; flattened to
``"conv1/kernel"`` keys it is an ``.npz`` (no pickle; numpy alone reads it). Loading fills an
abstract model (``nnx.eval_shape``, nothing allocated) with ``nnx.replace_by_pure_dict``. Orbax
also works, but writes a folder of files through tensorstore: more than one small pytree needs.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

import pipeline
from examples.frameworks.common import CLASS_NAMES, FEATURES, SEED, SPEC, load_npz, save_npz


class Net(nnx.Module):
    def __init__(self, num_classes: int = len(CLASS_NAMES), *, rngs: nnx.Rngs):
        f1, f2 = FEATURES
        self.conv1 = nnx.Conv(3, f1, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(f1, rngs=rngs)
        self.conv2 = nnx.Conv(f1, f2, (3, 3), strides=2, rngs=rngs)
        self.bn2 = nnx.BatchNorm(f2, rngs=rngs)
        self.head = nnx.Linear(f2, num_classes, rngs=rngs)

    def __call__(self, x):  # (B, 64, 64, 3) float32
        x = nnx.relu(self.bn1(self.conv1(x)))  # (B, 64, 64, 16)
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))  # (B, 32, 32, 16)
        x = nnx.relu(self.bn2(self.conv2(x)))  # (B, 16, 16, 32)
        return self.head(x.mean(axis=(1, 2)))  # (B, 5) logits


def new(seed: int = SEED) -> Net:
    """Seeded, untrained weights, in eval mode."""
    model = Net(rngs=nnx.Rngs(seed))
    model.eval()
    return model


def save(model: Net, path: str | Path) -> Path:
    """Params and BatchNorm statistics to an ``.npz`` of ``"layer/name"`` arrays."""
    return save_npz(path, flatten_dict(nnx.to_pure_dict(nnx.state(model)), sep="/"))


def load(path: str | Path) -> Net:
    """The model with the weights :func:`save` wrote, in eval mode."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0))))
    shapes = {k: v.shape for k, v in flatten_dict(nnx.to_pure_dict(state), sep="/").items()}
    flat = load_npz(path, shapes)
    nnx.replace_by_pure_dict(state, unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()},
                                                   sep="/"))
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def build(path: str | None) -> pipeline.Model:
    """Model factory (``--model-fn``): ``path`` is an ``.npz`` from :func:`save`, or None for
    the seeded weights."""
    model = load(path) if path is not None else new()
    model.eval()  # before the split: the graphdef carries use_running_average=True
    graphdef, state = nnx.split(model)

    def apply(state: nnx.State, x):
        return nnx.merge(graphdef, state)(x)

    return pipeline.Model(apply=apply, params=state, spec=SPEC, name="flax_nnx_cnn")


if __name__ == "__main__":
    from examples.frameworks.common import weights_cli

    weights_cli("examples.frameworks.flax_nnx", new, save)
