"""Photo-sized CNNs with random weights: what a realistic model costs, not what it predicts.

``batch-infer bench --workload photos --model-fn pipeline.bench.photo_cnn:build`` measures
decode and model on photos without a checkpoint: 160x160 RGB, four 3x3 stride-2 convs
(16/32/64/128 channels, each conv + bias + ReLU), global average pool, 1000 classes, ~1.1 ms
per image on two CPU cores at batch 32 (the workload measured in /work/shared/RESEARCH.md).
``build_small`` is the same at 32x32 with 8/16 channels and 10 classes, for tests.
"""

from __future__ import annotations

import numpy as np

from pipeline.model import Model, ModelSpec


def make(side: int, widths: tuple[int, ...], classes: int, seed: int = 0) -> Model:
    """A ``side`` x ``side`` RGB CNN, one stride-2 conv per width, He-normal weights."""
    rng = np.random.default_rng(seed)
    params, cin = {}, 3
    for i, cout in enumerate(widths):
        w = rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin))  # (3, 3, I, O)
        params[f"conv{i}"] = {"w": w.astype(np.float32), "b": np.zeros(cout, np.float32)}
        cin = cout
    params["dense"] = {"w": (rng.standard_normal((cin, classes)) / np.sqrt(cin)).astype(np.float32),
                       "b": np.zeros(classes, np.float32)}
    depth = len(widths)

    def apply(params, x):  # (B, side, side, 3) float32
        import jax
        from jax import lax

        for i in range(depth):
            x = lax.conv_general_dilated(x, params[f"conv{i}"]["w"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + params[f"conv{i}"]["b"])  # (B, h, w, widths[i])
        pooled = x.mean(axis=(1, 2))  # (B, widths[-1])
        return pooled @ params["dense"]["w"] + params["dense"]["b"]  # (B, classes)

    spec = ModelSpec(height=side, width=side, channels=3,
                     class_names=tuple(f"class_{i}" for i in range(classes)),
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return Model(apply=apply, params=params, spec=spec, name=f"photo_cnn_{side}")


def build(path: str | None = None) -> Model:
    """Model factory: 160x160 RGB, 16/32/64/128 channels, 1000 classes (``path`` unused)."""
    return make(160, (16, 32, 64, 128), 1000)


def build_small(path: str | None = None) -> Model:
    """Model factory: 32x32 RGB, 8/16 channels, 10 classes (``path`` unused), for tests."""
    return make(32, (8, 16), 10)
