"""The bundled CNN: Conv2D+Bias+ReLU -> Conv2D+Bias+ReLU -> Dense, NHWC.

Checkpoint = ``weights.npz`` (read with ``allow_pickle=False``) beside ``model.json``, which
holds the architecture, the input spec, the class names and a sha256 of the weights, so loading
rebuilds the model with no guessing. The trained checkpoint in this folder is the package's
default model (``batch-infer train`` makes a new one).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import Model, ModelError, ModelSpec

BUNDLED_DIR = Path(__file__).parent
WEIGHTS_FILE = "weights.npz"
META_FILE = "model.json"
FORMAT = "batch-infer/digits-cnn/v1"


@dataclass(frozen=True)
class CNNConfig:
    height: int = 32
    width: int = 32
    channels: int = 1
    conv1_features: int = 32
    conv2_features: int = 64
    kernel: int = 3
    # Stride 2 in both convs shrinks 32x32 to 8x8 before the Dense layer: 20k params instead
    # of 330k, with no pooling op between the fused conv+bias+relu kernels.
    stride: int = 2
    num_classes: int = 10
    contrast_stretch: bool = True

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        k, c1, c2 = self.kernel, self.conv1_features, self.conv2_features
        # SAME padding: each strided conv gives ceil(size / stride).
        h = _ceil_div(_ceil_div(self.height, self.stride), self.stride)
        w = _ceil_div(_ceil_div(self.width, self.stride), self.stride)
        return {
            "conv1/w": (k, k, self.channels, c1),
            "conv1/b": (c1,),
            "conv2/w": (k, k, c1, c2),
            "conv2/b": (c2,),
            "dense/w": (h * w * c2, self.num_classes),
            "dense/b": (self.num_classes,),
        }


def init_params(config: CNNConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """He-normal weights, zero biases, as float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in config.param_shapes().items():
        if name.endswith("/b"):
            params[name] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[:-1]))
            params[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return params


def make_apply(config: CNNConfig):
    """Return ``apply(params, x)``: float32 (B, H, W, C) -> logits (B, num_classes)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    stride = (config.stride, config.stride)
    dims = ("NHWC", "HWIO", "NHWC")

    def apply(params, x):
        if config.contrast_stretch:
            # Per image, darkest -> 0 and lightest -> 1: gray paper, faint ink or a dim scan then
            # looks like the training digits. The floor keeps a blank page blank.
            lo = x.min(axis=(1, 2, 3), keepdims=True)  # (B, 1, 1, 1)
            hi = x.max(axis=(1, 2, 3), keepdims=True)
            x = (x - lo) / jnp.maximum(hi - lo, 0.1)  # (B, H, W, C)
        for layer in ("conv1", "conv2"):
            x = lax.conv_general_dilated(x, params[f"{layer}/w"], stride, "SAME", dimension_numbers=dims)
            x = jax.nn.relu(x + params[f"{layer}/b"])  # XLA fuses bias+relu (into the conv on GPU)
        x = x.reshape(x.shape[0], -1)  # (B, 8*8*64)
        return x @ params["dense/w"] + params["dense/b"]  # (B, num_classes)

    return apply


def save(path: str | Path, config: CNNConfig, params: dict[str, Any], class_names, **extra) -> Path:
    """Write ``weights.npz`` + ``model.json`` into directory ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (out / WEIGHTS_FILE).write_bytes(buf.getvalue())
    meta = {
        "format": FORMAT,
        "architecture": asdict(config),
        "input": {"height": config.height, "width": config.width, "channels": config.channels,
                  "dtype": "uint8", "scale": 1.0 / 255.0, "offset": 0.0},
        "class_names": [str(c) for c in class_names],
        "weights_sha256": _weights_digest(arrays),
        **extra,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load(path: str | Path | None = None) -> tuple[CNNConfig, dict[str, np.ndarray], dict]:
    """Read and verify a checkpoint; raise one ModelError listing every problem."""
    root = Path(path) if path is not None else BUNDLED_DIR
    if root.is_file():
        root = root.parent
    meta_path, weights_path = root / META_FILE, root / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelError(f"No model at '{root}': expected {META_FILE} and {WEIGHTS_FILE} there.")
    try:
        meta = json.loads(meta_path.read_text())
        config = CNNConfig(**meta["architecture"])
        with np.load(weights_path, allow_pickle=False) as npz:
            params = {k: npz[k] for k in npz.files}
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelError(f"Unreadable model at '{root}': {type(e).__name__}: {e}") from e
    problems = _check(config, params)
    if not problems and meta.get("weights_sha256") != _weights_digest(params):
        problems.append("weights_sha256 in model.json does not match weights.npz")
    if problems:
        raise ModelError(f"Model at '{root}' does not match its architecture: " + "; ".join(problems))
    return config, params, meta


def build(path: str | None = None) -> Model:
    """Model factory (the default ``--model-fn``): the checkpoint at ``path`` or the bundled one."""
    config, params, meta = load(path)
    spec = ModelSpec(
        height=config.height, width=config.width, channels=config.channels,
        class_names=tuple(meta["class_names"]),
        scale=meta["input"]["scale"], offset=meta["input"]["offset"],
    )
    return Model(apply=make_apply(config), params=params, spec=spec, name="digits_cnn")


def _check(config: CNNConfig, params: dict[str, np.ndarray]) -> list[str]:
    expected = config.param_shapes()
    problems = [f"missing '{k}' {shape}" for k, shape in expected.items() if k not in params]
    problems += [f"unexpected '{k}'" for k in params if k not in expected]
    problems += [
        f"'{k}' has shape {params[k].shape}, expected {shape}"
        for k, shape in expected.items()
        if k in params and tuple(params[k].shape) != shape
    ]
    return problems


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _weights_digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        arr = np.ascontiguousarray(params[name], np.float32)
        h.update(f"{name}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
