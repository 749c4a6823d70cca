"""Deterministic ResNet-50 weights and inputs, numpy only: the same values reach torchvision (in
``make_resnet50_reference.py``) and our JAX model (in ``tests/test_resnet.py``).

Each tensor is drawn from its own generator seeded by (seed, crc32 of its key), so values do not
depend on the order of keys or on which keys exist.

The statistics keep activations in a sane range through 50 layers: He-normal convs preserve the
second moment through conv + ReLU, but every block adds its residual branch to the shortcut, so
with BN at identity the activations would grow about 2x per block (about 2^16 over the 16 blocks).
A small ``gamma`` on each block's last BN (``bn3``, what torchvision's ``zero_init_residual``
sets to 0) keeps the sum near the shortcut's scale, while the other BNs are near identity but
not exactly (``gamma`` 1 +- 0.1, small ``beta`` and ``running_mean``, ``running_var`` in
[0.5, 1.5]), so a mistake in folding any of the four statistics changes the logits.
"""

from __future__ import annotations

import zlib

import numpy as np

# Last-BN gamma scale: logits then have a standard deviation of a few units, wide enough that
# top-5 classes are well separated, small enough that float32 rounding stays ~1e-6 relative.
RESIDUAL_GAMMA = 0.2


def seeded_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The value of state-dict entry ``key`` (float32, or int64 for num_batches_tracked)."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return np.array(int(rng.integers(0, 10_000)), np.int64).reshape(shape)
    is_bn = len(shape) == 1 and not key.startswith("fc.")
    if leaf == "weight" and len(shape) == 4:  # conv, OIHW: He-normal on fan-in
        fan_in = int(np.prod(shape[1:]))
        values = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif leaf == "weight" and is_bn:
        gamma = 1.0 + 0.1 * rng.uniform(-1.0, 1.0, shape)
        values = gamma * (RESIDUAL_GAMMA if key.endswith(".bn3.weight") else 1.0)
    elif leaf in ("bias", "running_mean") and is_bn:
        values = 0.1 * rng.standard_normal(shape)
    elif leaf == "running_var":
        values = rng.uniform(0.5, 1.5, shape)
    elif key == "fc.weight":  # (1000, 2048)
        values = rng.standard_normal(shape) * np.sqrt(1.0 / shape[1])
    elif key == "fc.bias":
        values = 0.01 * rng.standard_normal(shape)
    else:
        raise KeyError(f"no seeded rule for state-dict key '{key}' {shape}")
    return values.astype(np.float32)


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """``{key: seeded_tensor(key, shape, seed)}`` for every key of ``shapes``."""
    return {key: seeded_tensor(key, tuple(shape), seed) for key, shape in shapes.items()}


def write_checkpoint(path, seed: int = 0):
    """The seeded weights as the .safetensors file the README's export command writes: every
    key, shape and dtype of torchvision's resnet50 state dict (resnet50_state_dict.json).
    Returns the path. Needs this package (its safetensors writer), unlike the rest here."""
    import json
    from pathlib import Path

    from pipeline.models import safetensors

    keys = json.loads((Path(__file__).parent / "resnet50_state_dict.json").read_text())["keys"]
    state = seeded_state_dict({k: tuple(v["shape"]) for k, v in keys.items()}, seed)
    return safetensors.write(path, {k: v.astype(keys[k]["dtype"]) for k, v in state.items()})


def reference_inputs(seed: int, count: int, size: int) -> np.ndarray:
    """(count, 3, size, size) float32, NCHW, already normalised: blocky 8x8-cell colour fields
    plus fine noise. Global average pooling washes white noise out, so images of noise alone give
    nearly the same logits; the coarse structure makes each image's logits its own."""
    rng = np.random.default_rng(seed)
    cells = rng.standard_normal((count, 3, 8, 8)) * 1.5  # (N, 3, 8, 8)
    coarse = np.kron(cells, np.ones((1, 1, -(-size // 8), -(-size // 8))))[..., :size, :size]
    fine = 0.5 * rng.standard_normal((count, 3, size, size))
    return (coarse + fine).astype(np.float32)  # (N, 3, size, size)
