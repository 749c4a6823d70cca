"""A second model for the pipeline: the colour of the object in an RGB photo, in plain JAX.

Different from the bundled digits CNN on purpose: 3 channels, a 48x64 (not square) input,
per-channel mean/std normalisation, global average pooling, nested (Flax-style) params, and two
factories over one checkpoint::

    --model-fn examples.color_classifier.color_model:build           # label, score, top-k
    --model-fn examples.color_classifier.color_model:build_embedder  # a 32-d embedding column

Checkpoint: a directory with ``weights.npz`` (flat "params/Conv_0/kernel" keys, read with
``allow_pickle=False``) and ``model.json`` (architecture, input normalisation, class names).
``train.py`` beside this file makes one (about 10 s of CPU time).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import pipeline

HEIGHT, WIDTH = 48, 64
META_FILE, WEIGHTS_FILE = "model.json", "weights.npz"
FORMAT = "batch-infer-example/color-classifier/v1"


def param_shapes(num_classes: int, features: tuple[int, int] = (16, 32), embed: int = 32) -> dict:
    """Flax-style nested shapes: {"params": {"Conv_0": {"kernel": ..., "bias": ...}, ...}}."""
    f1, f2 = features
    return {"params": {
        "Conv_0": {"kernel": (3, 3, 3, f1), "bias": (f1,)},
        "Conv_1": {"kernel": (3, 3, f1, f2), "bias": (f2,)},
        "Embed": {"kernel": (f2, embed), "bias": (embed,)},
        "Head": {"kernel": (embed, num_classes), "bias": (num_classes,)},
    }}


def init_params(num_classes: int, seed: int = 0) -> dict:
    """He-normal kernels, zero biases (float32 numpy)."""
    import jax

    rng = np.random.default_rng(seed)

    def init(shape):
        if len(shape) == 1:
            return np.zeros(shape, np.float32)
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map(init, param_shapes(num_classes), is_leaf=lambda s: isinstance(s, tuple))


def embed(params, x):
    """(B, 48, 64, 3) float32 -> (B, 32) features, before the classifier head."""
    import jax
    from jax import lax

    p = params["params"]
    for name in ("Conv_0", "Conv_1"):
        x = lax.conv_general_dilated(
            x, p[name]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + p[name]["bias"])  # (B, H/2, W/2, F) then (B, H/4, W/4, F)
    x = x.mean(axis=(1, 2))  # (B, F): global average pool, so any object position works
    return jax.nn.relu(x @ p["Embed"]["kernel"] + p["Embed"]["bias"])  # (B, 32)


def apply(params, x):
    """(B, 48, 64, 3) float32 -> (B, num_classes) logits."""
    return embed(params, x) @ params["params"]["Head"]["kernel"] + params["params"]["Head"]["bias"]


def apply_embedding(params, x):
    """(B, 48, 64, 3) float32 -> (B, 32) unit vectors: cosine similarity is a dot product."""
    import jax.numpy as jnp

    e = embed(params, x)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6)


def save(path: str | Path, params: dict, class_names, mean, std) -> Path:
    """Write ``weights.npz`` + ``model.json`` into directory ``path``."""
    import jax

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    flat = {
        "/".join(k.key for k in keys): np.asarray(v, np.float32)
        for keys, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(out / WEIGHTS_FILE, **flat)
    meta = {
        "format": FORMAT,
        "input": {"height": HEIGHT, "width": WIDTH, "channels": 3,
                  "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "class_names": list(class_names),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load(path: str | Path) -> tuple[dict, dict]:
    """Read a checkpoint; raise one error listing every missing, extra or misshapen array."""
    root = Path(path)
    if not (root / META_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no color_model checkpoint at '{root}' (run train.py to make one)")
    meta = json.loads((root / META_FILE).read_text())
    with np.load(root / WEIGHTS_FILE, allow_pickle=False) as npz:
        flat = {k: npz[k] for k in npz.files}
    expected = _flat(param_shapes(len(meta["class_names"])))
    problems = [f"missing '{k}'" for k in expected if k not in flat]
    problems += [f"unexpected '{k}'" for k in flat if k not in expected]
    problems += [f"'{k}' is {flat[k].shape}, expected {s}" for k, s in expected.items()
                 if k in flat and flat[k].shape != s]
    if problems:
        raise ValueError(f"checkpoint at '{root}' does not match the model: " + "; ".join(problems))
    params: dict = {}
    for key, value in flat.items():  # "params/Conv_0/kernel" -> params["params"]["Conv_0"]["kernel"]
        *parents, leaf = key.split("/")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params, meta


def spec_for(meta: dict, **output) -> pipeline.ModelSpec:
    i = meta["input"]
    return pipeline.ModelSpec(
        height=i["height"], width=i["width"], channels=i["channels"],
        mean=tuple(i["mean"]), std=tuple(i["std"]), **output,
    )


def build(path: str | None) -> pipeline.Model:
    """Model factory (``--model-fn``): classify the colour; ``path`` is the checkpoint directory."""
    if path is None:
        raise ValueError("pass the checkpoint directory with --model (train.py writes one)")
    params, meta = load(path)
    spec = spec_for(meta, class_names=tuple(meta["class_names"]))
    return pipeline.Model(apply=apply, params=params, spec=spec, name="color_classifier")


def build_embedder(path: str | None) -> pipeline.Model:
    """Model factory: the same checkpoint as a 32-d embedding model."""
    if path is None:
        raise ValueError("pass the checkpoint directory with --model (train.py writes one)")
    params, meta = load(path)
    dim = params["params"]["Embed"]["bias"].shape[0]
    spec = spec_for(meta, output="embedding", embedding_dim=dim)
    return pipeline.Model(apply=apply_embedding, params=params, spec=spec, name="color_embedder")


def _flat(tree: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
