"""ResNet-50 in plain JAX (NHWC), loading the torchvision or timm weights users already have.

``batch-infer run --model-fn pipeline.models.resnet:build --model resnet50.safetensors ...``

The architecture is torchvision's ``resnet50``: a 7x7/2 stem and 3x3/2 max pool, then
Bottleneck blocks (1x1 -> 3x3 -> 1x1, 4x expansion; 3, 4, 6, 3 per stage) with the stride on
the 3x3 conv ("v1.5"), a 1x1 conv + BN projection on each stage's first block, global average
pool and a 1000-way ``fc``. timm's ``resnet50`` (default stem and downsample) uses the same
module names, so its state dict has the same keys: checked against timm's ``models/resnet.py``
(``conv1``/``bn1``, ``layer{1-4}.{i}.conv{1-3}``/``bn{1-3}``, ``downsample.0``/``.1``, ``fc``).

Weights come from a ``.safetensors`` state dict (F32, F16 or BF16; no pickle, no torch at run
time). Loading checks every key, shape and dtype and reports all mismatches in one error, then
folds each BatchNorm into the conv before it (inference uses only its running statistics), so
``apply`` is conv + bias + ReLU only: 53 convs, no normalisation ops. Params are float32, HWIO.

Preprocessing is torchvision's evaluation transform for its IMAGENET1K_V1 weights: shorter side
to 256 (224 / 0.875) with bilinear filtering, center 224x224 crop, ImageNet mean/std.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import Model, ModelError, ModelSpec
from pipeline.models import safetensors

# (bottleneck width, blocks) per stage; each block outputs 4x its width.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
EXPANSION = 4
STEM_WIDTH = 64
NUM_CLASSES = 1000
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which both torchvision and timm use
CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
# IMAGENET1K_V1 in the hint because the spec reproduces V1's evaluation transform; V2 weights
# were evaluated after a 232 (not 256) resize and lose a little accuracy with this one.
EXPORT_HINT = (
    "ResNet-50 needs a state dict in safetensors format (--model resnet50.safetensors); export "
    "one where torch is installed: python -c \"import torchvision; from safetensors.torch import "
    "save_file; save_file(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), "
    "'resnet50.safetensors')\" (pip install torch torchvision safetensors), or from timm: "
    "save_file(timm.create_model('resnet50', pretrained=True).state_dict(), "
    "'resnet50.safetensors')."
)


def build(path: str | None) -> Model:
    """Model factory: ResNet-50 with the torchvision/timm state dict at ``path`` (.safetensors)."""
    if path is None:
        raise ModelError(EXPORT_HINT)
    spec = ModelSpec(
        height=224, width=224, channels=3,
        class_names=imagenet_classes(),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        resize="center_crop", crop_fraction=0.875, interpolation="bilinear",
    )
    return Model(apply=apply, params=load(path), spec=spec, name="resnet50")


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in torchvision's order (the logits' order)."""
    names = tuple(CLASSES_FILE.read_text().splitlines())
    if len(names) != NUM_CLASSES:
        raise ModelError(f"'{CLASSES_FILE}' holds {len(names)} class names, expected 1000.")
    return names


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ResNet-50 state dict from ``path``, check it, and fold it into float32 params."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"No ResNet-50 weights at '{path}'. {EXPORT_HINT}")
    state = safetensors.read_state_dict(path)  # a DDP wrapper's "module." prefix dropped
    problems = check_state_dict(state)
    if problems:
        raise ModelError(
            f"'{path}' is not a torchvision/timm ResNet-50 state dict: " + "; ".join(problems) + "."
        )
    return fold_state_dict(state)


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's ``resnet50().state_dict()`` and its shape, in its order."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, bn: str, out: int, inp: int, k: int) -> None:
        shapes[f"{conv}.weight"] = (out, inp, k, k)  # torch's OIHW
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{stat}"] = (out,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("conv1", "bn1", STEM_WIDTH, 3, 7)
    channels = STEM_WIDTH
    for block, _, width, downsample in _blocks():
        conv_bn(f"{block}.conv1", f"{block}.bn1", width, channels, 1)
        conv_bn(f"{block}.conv2", f"{block}.bn2", width, width, 3)
        conv_bn(f"{block}.conv3", f"{block}.bn3", width * EXPANSION, width, 1)
        if downsample:
            conv_bn(f"{block}.downsample.0", f"{block}.downsample.1", width * EXPANSION,
                    channels, 1)
        channels = width * EXPANSION
    shapes["fc.weight"] = (NUM_CLASSES, channels)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def check_state_dict(state: dict[str, np.ndarray]) -> list[str]:
    """Every missing, unexpected, misshapen, mistyped or non-finite entry; empty if it fits."""
    expected = state_dict_shapes()
    # BatchNorm's step counter matters only in training; checkpoints saved before torch 0.4.1
    # (and some cleaned exports) lack it, so it is accepted but not required.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [
        f"'{k}' {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    present = [k for k in expected if k in state and tuple(state[k].shape) == expected[k]]
    counters = {k for k in present if k.endswith(".num_batches_tracked")}
    mistyped = [
        f"'{k}' {state[k].dtype} (expected {'an integer' if k in counters else 'a float'})"
        for k in present
        if safetensors.is_float(state[k]) == (k in counters)
    ]
    # A well-formed file can still hold garbage (a failed export, a diverged run): NaN weights
    # or a negative variance would only surface as NaN rows, so name them here.
    invalid = [
        f"'{k}'" for k in present
        if k not in counters and safetensors.is_float(state[k]) and (
            not np.isfinite(state[k]).all() or k.endswith("running_var") and (state[k] < 0).any()
        )
    ]
    problems = []
    for label, items in (("missing", [f"'{k}'" for k in missing]),
                         ("unexpected", [f"'{k}'" for k in unexpected]),
                         ("misshapen", misshapen), ("wrong dtype", mistyped),
                         ("non-finite or negative-variance values", invalid)):
        if items:
            problems.append(f"{len(items)} {label}: " + ", ".join(items))
    return problems


def fold_state_dict(state: dict[str, np.ndarray], eps: float = BN_EPS) -> dict[str, Any]:
    """A checked state dict -> params: each conv with its BatchNorm folded in, HWIO float32.

    ``{"stem": conv, "layers": [[block, ...] per stage], "fc": {"w": (2048, 1000), "b"}}``,
    where a block is ``{"conv1", "conv2", "conv3"[, "downsample"]}`` and a conv ``{"w", "b"}``.
    """
    def fold(conv: str, bn: str) -> dict[str, np.ndarray]:
        return fold_conv_bn(
            state[f"{conv}.weight"], state[f"{bn}.weight"], state[f"{bn}.bias"],
            state[f"{bn}.running_mean"], state[f"{bn}.running_var"], eps,
        )

    layers: list[list[dict]] = [[] for _ in STAGES]
    for b, stage, _, downsample in _blocks():
        block = {f"conv{j}": fold(f"{b}.conv{j}", f"{b}.bn{j}") for j in (1, 2, 3)}
        if downsample:
            block["downsample"] = fold(f"{b}.downsample.0", f"{b}.downsample.1")
        layers[stage].append(block)
    fc = {
        "w": np.asarray(state["fc.weight"], np.float32).T.copy(),  # (2048, 1000)
        "b": np.asarray(state["fc.bias"], np.float32),  # (1000,)
    }
    return {"stem": fold("conv1", "bn1"), "layers": layers, "fc": fc}


def fold_conv_bn(w, gamma, beta, mean, var, eps: float = BN_EPS) -> dict[str, np.ndarray]:
    """BN(conv(x, w)) == conv(x, w') + b' with w' = w * s, b' = beta - mean * s,
    s = gamma / sqrt(var + eps); ``w`` torch OIHW in, HWIO out."""
    # float64 so folding adds no rounding beyond the final cast (bf16/f16 inputs upcast exactly).
    w, gamma, beta, mean, var = (np.asarray(a, np.float64) for a in (w, gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)  # (O,)
    folded = w * scale[:, None, None, None]  # (O, I, kh, kw)
    return {
        "w": folded.transpose(2, 3, 1, 0).astype(np.float32),  # (kh, kw, I, O)
        "b": (beta - mean * scale).astype(np.float32),  # (O,)
    }


def apply(params: dict[str, Any], x):
    """ResNet-50 forward: (B, H, W, 3) float32, normalised -> (B, 1000) logits.

    Any H, W >= 32 works (global average pool); the spec feeds 224x224.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    x = jax.nn.relu(_conv(x, params["stem"], stride=2))  # (B, H/2, W/2, 64)
    # torch pads max pooling with -inf, so a border window takes the max of real pixels only.
    x = lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), lax.max,
        (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)),
    )  # (B, H/4, W/4, 64)
    for stage, blocks in enumerate(params["layers"]):
        for i, block in enumerate(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            y = jax.nn.relu(_conv(x, block["conv1"]))  # (B, h, w, width)
            y = jax.nn.relu(_conv(y, block["conv2"], stride))  # (B, h/s, w/s, width)
            y = _conv(y, block["conv3"])  # (B, h/s, w/s, 4 * width)
            shortcut = _conv(x, block["downsample"], stride) if "downsample" in block else x
            x = jax.nn.relu(y + shortcut)
    x = x.mean(axis=(1, 2))  # (B, 2048)
    return x @ params["fc"]["w"] + params["fc"]["b"]  # (B, 1000)


def _conv(x, conv: dict, stride: int = 1):
    from jax import lax

    k = conv["w"].shape[0]
    # torch's symmetric padding k // 2; "SAME" would pad a stride-2 conv (0, 1) instead of (1, 1)
    # on even sizes and shift every feature map by a pixel.
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    y = lax.conv_general_dilated(
        x, conv["w"], (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + conv["b"]


def _blocks():
    """(key prefix like "layer2.0", stage index, width, has downsample) per Bottleneck, in order."""
    for stage, (width, count) in enumerate(STAGES):
        for i in range(count):
            # Each stage's first block changes the channel count (layer1's too: 64 -> 256) and,
            # after layer1, the stride, so torchvision projects its shortcut.
            yield f"layer{stage + 1}.{i}", stage, width, i == 0
