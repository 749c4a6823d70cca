"""Equinox recipe: a module that sees one channels-first image, with BatchNorm state.

    batch-infer run --model-fn examples.frameworks.equinox_cnn:build --input DIR --output OUT
    python -m examples.frameworks.equinox_cnn --output /tmp/eqx.eqx   # then --model /tmp/eqx.eqx

(The module is not named ``equinox.py``: that would shadow the package it imports.)
What differs from the pipeline's contract, and how :func:`build` bridges it:

- Equinox layers take **one image, channels-first** ``(C, H, W)``; the pipeline hands a batch,
  channels-last ``(B, H, W, C)``. ``apply`` transposes to ``(B, C, H, W)`` and vmaps
  the model over the batch.
- **BatchNorm keeps its statistics in an** ``eqx.nn.State``, beside the module
  (``eqx.nn.make_with_state``). ``eqx.nn.inference_mode(model)`` makes it read them instead
  of the batch's; inference only reads the state, so ``apply`` drops the state it returns, and
  the vmap needs no ``axis_name`` (training does: BatchNorm averages across it).
- **params** ``= (arrays, state)``: ``eqx.partition(model, eqx.is_array)`` splits the module
  into its arrays (what the pipeline moves and fingerprints) and the static rest, which
  ``apply`` closes over and recombines with ``eqx.combine``.

Weights: ``eqx.tree_serialise_leaves(path, (model, state))`` writes the leaves in order (numpy's
format, no pickle); ``tree_deserialise_leaves`` reads them into a skeleton of the same structure
(``eqx.filter_eval_shape``, nothing allocated), and stops at the first leaf whose shape or type
differs.
"""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import pipeline
from examples.frameworks.common import CLASS_NAMES, FEATURES, SEED, SPEC


class Net(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    pool: eqx.nn.AvgPool2d
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array, num_classes: int = len(CLASS_NAMES)):
        f1, f2 = FEATURES
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, f1, 3, padding=1, key=k1)
        # mode="batch", as Equinox advises for new code: its statistics start at mean 0 and
        # variance 1. "ema" (what an unspecified mode means, with a warning) leaves them empty
        # until the first training step, so an untrained model would read garbage. A checkpoint
        # keeps its mode: the two keep different state.
        self.bn1 = eqx.nn.BatchNorm(f1, axis_name="batch", mode="batch")
        self.pool = eqx.nn.AvgPool2d(2, stride=2)
        self.conv2 = eqx.nn.Conv2d(f1, f2, 3, stride=2, padding=1, key=k2)
        self.bn2 = eqx.nn.BatchNorm(f2, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(f2, num_classes, key=k3)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        x, state = self.bn1(self.conv1(x), state)  # (16, 64, 64): one image, channels first
        x = self.pool(jax.nn.relu(x))  # (16, 32, 32)
        x, state = self.bn2(self.conv2(x), state)  # (32, 16, 16)
        return self.head(jax.nn.relu(x).mean(axis=(1, 2))), state  # (5,) logits


def new(seed: int = SEED) -> tuple[Net, eqx.nn.State]:
    """Seeded, untrained ``(model, state)``, the model in inference mode."""
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(seed))
    return eqx.nn.inference_mode(model), state


def save(model_and_state: tuple[Net, eqx.nn.State], path: str | Path) -> Path:
    """``(model, state)`` to one file of leaves (``.eqx`` by convention)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(out, model_and_state)
    return out


def load(path: str | Path) -> tuple[Net, eqx.nn.State]:
    """The ``(model, state)`` :func:`save` wrote, the model in inference mode."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Equinox weights file at '{path}'")
    like = eqx.filter_eval_shape(new)  # the structure and shapes, nothing allocated
    try:
        model, state = eqx.tree_deserialise_leaves(path, like)
    except RuntimeError as e:  # Equinox's message names the leaf but not the file
        raise ValueError(f"weights at '{path}' do not match the model: {e}") from e
    return eqx.nn.inference_mode(model), state


def build(path: str | None) -> pipeline.Model:
    """Model factory (``--model-fn``): ``path`` is a file from :func:`save`, or None for the
    seeded weights."""
    model, state = load(path) if path is not None else new()
    model = eqx.nn.inference_mode(model)  # BatchNorm reads its running statistics
    arrays, static = eqx.partition(model, eqx.is_array)

    def apply(params: tuple[Net, eqx.nn.State], x: jax.Array) -> jax.Array:
        arrays, state = params
        net = eqx.combine(arrays, static)
        x = jnp.transpose(x, (0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W): convs are NCHW
        return jax.vmap(lambda image: net(image, state)[0])(x)  # (B, 5) logits

    return pipeline.Model(apply=apply, params=(arrays, state), spec=SPEC, name="equinox_cnn")


if __name__ == "__main__":
    from examples.frameworks.common import weights_cli

    weights_cli("examples.frameworks.equinox_cnn", new, save)
