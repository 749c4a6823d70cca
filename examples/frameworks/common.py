"""What the four framework recipes share: the input spec and class names, and a flat ``.npz``
weights file that loads without pickle and reports every mismatch at once.

Every recipe builds the same small CNN, so their outputs differ only by framework::

    conv 3x3, 16 -> BatchNorm -> ReLU -> avg-pool 2x2     (B, 32, 32, 16)
    conv 3x3 stride 2, 32 -> BatchNorm -> ReLU -> mean    (B, 32)
    dense -> logits                                       (B, 5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

import pipeline

SEED = 0  # build(None) makes its weights from this seed: runs out of the box, no training
CLASS_NAMES = ("airplane", "car", "bird", "cat", "dog")
FEATURES = (16, 32)
SPEC = pipeline.ModelSpec(
    height=64, width=64, channels=3, class_names=CLASS_NAMES,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # ImageNet's, on pixel / 255
)


def save_npz(path: str | Path, flat: Mapping[str, np.ndarray]) -> Path:
    """Write ``{"block/layer/kernel": array}`` to ``path`` (an ``.npz``), creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
        np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
    return out


def load_npz(path: str | Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Read an ``.npz`` written by :func:`save_npz` and check it against ``expected`` shapes;
    one error lists every missing, unexpected and misshapen array."""
    with np.load(path, allow_pickle=False) as npz:  # FileNotFoundError names the path
        flat = {k: npz[k] for k in npz.files}
    problems = [f"missing '{k}'" for k in expected if k not in flat]
    problems += [f"unexpected '{k}'" for k in flat if k not in expected]
    problems += [f"'{k}' is {flat[k].shape}, expected {tuple(s)}" for k, s in expected.items()
                 if k in flat and flat[k].shape != tuple(s)]
    if problems:
        raise ValueError(f"weights at '{path}' do not match the model: " + "; ".join(problems))
    return flat


def weights_cli(module: str, new, save, argv: list[str] | None = None) -> None:
    """``python -m examples.frameworks.X --output FILE [--seed N]``: write seeded weights with the
    recipe's own ``save``, so ``--model FILE`` shows the load half of the round trip."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description="Write this recipe's (seeded, untrained) weights."
    )
    parser.add_argument("--output", required=True, help="weights file to write")
    parser.add_argument("--seed", type=int, default=SEED, help=f"default {SEED}, as build(None)")
    args = parser.parse_args(argv)
    print(save(new(args.seed), args.output))
