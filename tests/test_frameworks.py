"""The framework recipes (examples/frameworks/): each factory's model gives what the framework's
own call gives, survives a save -> load round trip and runs through the pipeline; and why every
recipe runs in inference mode (BatchNorm in training mode lets the rows of a batch, padding
included, change each other's outputs).

A framework's tests are skipped only when its package cannot be imported."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

import pipeline
from pipeline.decode import decode_image
from pipeline.model import ModelError, load_model

# Ray's workers import examples.frameworks.* as test_byo_model's do examples.color_classifier:
# from the repository root, the directory pytest and Ray's local workers start in.
PACKAGE = "examples.frameworks"
IMAGES = 6


@dataclass(frozen=True)
class Recipe:
    module: str  # under examples/frameworks/
    requires: str  # the package whose absence skips the recipe
    weights_file: str  # what its save() writes
    direct: Callable[[Any, Any, Any], Any]  # (recipe module, new()'s object, x) -> logits
    perturb: Callable[[Any, Any], Any]  # (recipe module, new()'s object) -> other weights

    def load(self):
        # find_spec, not importorskip: `import keras` before KERAS_BACKEND=jax is set would
        # fail (no TensorFlow) or pick another backend, and the recipe module sets it itself.
        if importlib.util.find_spec(self.requires) is None:
            pytest.skip(f"{self.requires} is not installed")
        return importlib.import_module(f"{PACKAGE}.{self.module}")

    @property
    def factory(self) -> str:
        return f"{PACKAGE}.{self.module}:build"


def _noise(a):
    """Every float array moved (scaled and shifted, variances stay positive): saved weights
    that differ from build(None)'s in every array, BatchNorm statistics included."""
    a = np.asarray(a)
    rng = np.random.default_rng(a.size)
    return (a * rng.uniform(0.5, 1.5, a.shape) + rng.uniform(0.0, 0.2, a.shape)).astype(a.dtype)


def _nnx_direct(mod, net, x):
    return net(x)


def _nnx_perturb(mod, net):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(net)  # the graphdef keeps eval mode
    return nnx.merge(graphdef, jax.tree_util.tree_map(_noise, state))


def _linen_direct(mod, variables, x):
    return mod.NET.apply(variables, x)  # train defaults to False


def _linen_perturb(mod, variables):
    import jax

    return jax.tree_util.tree_map(_noise, variables)


def _eqx_direct(mod, model_and_state, x):
    import equinox as eqx

    # Equinox's own call: one image at a time, channels first (jitted: eager ops are slow).
    call = eqx.filter_jit(lambda model, state, image: model(image, state)[0])
    return np.stack([call(*model_and_state, np.transpose(image, (2, 0, 1))) for image in x])


def _eqx_perturb(mod, model_and_state):
    import equinox as eqx
    import jax

    floats, rest = eqx.partition(model_and_state, eqx.is_inexact_array)
    return eqx.combine(jax.tree_util.tree_map(_noise, floats), rest)


def _keras_direct(mod, model, x):
    return model(x, training=False)


def _keras_perturb(mod, model):
    for v in model.variables:  # moving mean and variance included
        v.assign(_noise(v.value))
    return model


RECIPES = [
    Recipe("flax_nnx", "flax", "nnx.npz", _nnx_direct, _nnx_perturb),
    Recipe("flax_linen", "flax", "linen.npz", _linen_direct, _linen_perturb),
    Recipe("equinox_cnn", "equinox", "eqx.eqx", _eqx_direct, _eqx_perturb),
    Recipe("keras_jax", "keras", "keras.weights.h5", _keras_direct, _keras_perturb),
]
ids = pytest.mark.parametrize("recipe", RECIPES, ids=[r.module for r in RECIPES])


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    """Six photos-to-be: a coloured shape on a gradient, sizes that need resizing."""
    root = tmp_path_factory.mktemp("framework-images")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        w, h = 80 + 8 * i, 60 + 4 * i
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0, 1, 3)
        img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
        box = [int(v) for v in rng.integers(0, min(w, h) // 2, 2)] + [w - 10, h - 10]
        ImageDraw.Draw(img).ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(root / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def batch(images_dir) -> np.ndarray:
    """The images as the pipeline decodes them: (6, 64, 64, 3) uint8."""
    from examples.frameworks.common import SPEC

    return np.stack([decode_image(p.read_bytes(), SPEC) for p in sorted(images_dir.iterdir())])


def _softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _expected(recipe: Recipe, mod, obj, batch: np.ndarray) -> np.ndarray:
    """Probabilities from the framework's own call on the normalised images."""
    import jax

    x = np.asarray(jax.jit(mod.SPEC.normalise)(batch))  # (6, 64, 64, 3) float32
    return _softmax(recipe.direct(mod, obj, x))


@ids
def test_factory_predicts_what_the_framework_computes(recipe, batch):
    mod = recipe.load()
    model = load_model(None, recipe.factory)
    probs = model.predict(batch, batch_size=8)  # (6, 5): padded to 8, as in the pipeline
    np.testing.assert_allclose(probs, _expected(recipe, mod, mod.new(), batch), atol=1e-5)
    assert model.spec.class_names == mod.CLASS_NAMES
    assert np.ptp(probs, axis=0).max() > 1e-3 and probs.max() < 0.99, "a degenerate model"
    # In inference mode a row's output is its own: other rows of the batch change nothing.
    others = batch.copy()
    others[1:] = 255 - batch[1:]
    np.testing.assert_allclose(model.predict(others, batch_size=8)[0], probs[0], atol=1e-6)


@ids
def test_weights_round_trip(recipe, batch, tmp_path):
    mod = recipe.load()
    saved = recipe.perturb(mod, mod.new(seed=1))
    path = mod.save(saved, tmp_path / recipe.weights_file)
    model = load_model(path, recipe.factory)
    probs = model.predict(batch, batch_size=8)
    np.testing.assert_allclose(probs, _expected(recipe, mod, saved, batch), atol=1e-5)
    assert not np.allclose(probs, load_model(None, recipe.factory).predict(batch), atol=1e-3)
    with pytest.raises(ModelError, match="could not find its weights"):
        load_model(tmp_path / "missing" / recipe.weights_file, recipe.factory)


def test_weights_of_another_model_are_refused_with_every_mismatch(tmp_path):
    flax_nnx = RECIPES[0].load()
    flax_linen = RECIPES[1].load()
    path = flax_linen.save(flax_linen.new(), tmp_path / "linen.npz")
    with pytest.raises(ValueError, match="do not match the model") as e:
        flax_nnx.load(path)
    assert "missing 'conv1/kernel'" in str(e.value)
    assert "unexpected 'params/conv1/kernel'" in str(e.value)

    equinox_cnn = RECIPES[2].load()
    import equinox as eqx
    import jax

    three = eqx.nn.make_with_state(equinox_cnn.Net)(jax.random.key(0), num_classes=3)
    path = equinox_cnn.save(three, tmp_path / "three.eqx")
    with pytest.raises(ValueError, match="three.eqx' do not match the model") as e:
        equinox_cnn.load(path)
    assert "name='head'" in str(e.value) and "from (5, 32) in `like` to (3, 32)" in str(e.value)


@ids
def test_runs_through_the_pipeline(recipe, ray_local, images_dir, batch, tmp_path):
    mod = recipe.load()
    weights = mod.save(mod.new(seed=1), tmp_path / recipe.weights_file)  # as --model would
    out = tmp_path / "out"
    summary = pipeline.run(str(images_dir), str(out), model_fn=recipe.factory,
                           model=str(weights), batch_size=4)
    assert summary.rows_ok == IMAGES and summary.rows_error == 0
    rows = sorted(pq.read_table(out).to_pylist(), key=lambda r: r["path"])
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in images_dir.iterdir())
    assert all(r["status"] == "ok" and r["label_name"] in mod.CLASS_NAMES for r in rows)
    # Run two ways: the rows Ray's actors wrote equal the model applied here.
    direct = load_model(weights, recipe.factory).predict(batch)  # (6, 5)
    np.testing.assert_array_equal([r["label"] for r in rows], direct.argmax(axis=1))
    np.testing.assert_allclose([r["score"] for r in rows], direct.max(axis=1), atol=1e-5)


# Training mode, and why the recipes avoid it. The pipeline pads a short batch with zero images
# and may run any images together; a model whose rows influence each other gives an image
# different outputs depending on its batch. The pipeline's start-up check for this can use
# `linen_in_training_mode` below as the model it must refuse.


def linen_in_training_mode(path: str | None) -> pipeline.Model:
    """The Linen recipe's model with ``train=True``: the mistake the recipes avoid. BatchNorm
    then normalises with the statistics of the batch (the updated statistics are discarded)."""
    from examples.frameworks import flax_linen

    def apply(variables, x):
        logits, _updates = flax_linen.NET.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits

    return pipeline.Model(apply=apply, params=flax_linen.new(), spec=flax_linen.SPEC,
                          name="linen_in_training_mode")


def row_zero_change(apply: Callable[[Any, Any], Any], params: Any, spec: pipeline.ModelSpec,
                    images: np.ndarray) -> float:
    """How much row 0's output moves when the other rows of its batch are the pipeline's padding
    (zero images) instead of other images: 0 for a model whose rows are independent."""
    import jax

    run = jax.jit(lambda params, images: apply(params, spec.normalise(images)))
    padded = np.zeros_like(images)  # (B, H, W, C) uint8
    padded[0] = images[0]
    alone, together = np.asarray(run(params, padded))[0], np.asarray(run(params, images))[0]
    return float(np.abs(together - alone).max())


def test_batchnorm_in_training_mode_lets_rows_influence_each_other(batch):
    flax_linen = RECIPES[1].load()
    training = linen_in_training_mode(None)
    assert row_zero_change(training.apply, training.params, training.spec, batch) > 0.1
    inference = functools.partial(flax_linen.NET.apply, train=False)  # the recipe's apply
    assert row_zero_change(inference, training.params, training.spec, batch) < 1e-6
