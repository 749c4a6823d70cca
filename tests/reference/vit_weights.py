"""Deterministic ViT weights (CLIP's vision tower in transformers' names, torchvision's and
timm's ViTs), numpy only: the same values reach transformers, torchvision and timm (in
``make_clip_reference.py``, ``make_vit_reference.py``) and our JAX ViT (in
``tests/test_clip.py``, ``tests/test_vit.py``).

Each tensor is drawn from its own generator seeded by (seed, crc32 of its key), as in
``resnet_weights``. Linears are normal with variance 1/fan_in, so after a LayerNorm queries and
keys have unit entries and attention logits (scaled by 1/sqrt(head width)) stay of order 1:
softmaxes that are neither flat nor one-hot, so a mistake in the attention shows. LayerNorm
scales are 1 +- 0.1 and biases are small but not zero, so a swapped scale and bias, or a
LayerNorm left out, moves the embeddings.
"""

from __future__ import annotations

import zlib

import numpy as np


def seeded_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The float32 value of ViT state-dict entry ``key``."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    module, _, leaf = key.rpartition(".")
    if "norm" in module or module.rsplit(".", 1)[-1] in ("ln", "ln_1", "ln_2"):
        # CLIP's layer_norm1/2, pre_layrnorm, post_layernorm; torchvision's ln_1, ln_2, ln
        values = (1.0 + 0.1 * rng.uniform(-1.0, 1.0, shape) if leaf == "weight"
                  else 0.1 * rng.standard_normal(shape))
    elif leaf == "weight" and len(shape) == 4:  # the patch conv, (D, 3, p, p)
        values = rng.standard_normal(shape) * np.sqrt(1.0 / np.prod(shape[1:]))
    elif key.endswith(("class_embedding", "position_embedding.weight", "class_token",
                       "pos_embedding", "cls_token", "pos_embed")):
        values = 0.5 * rng.standard_normal(shape)
    elif leaf == "gamma":  # timm's layer scale (DeiT III): small, as trained ones are
        values = 0.1 * (1.0 + 0.2 * rng.uniform(-1.0, 1.0, shape))
    elif leaf.endswith("weight") and len(shape) == 2:  # torch Linear (out, in); in_proj_weight
        values = rng.standard_normal(shape) * np.sqrt(1.0 / shape[1])
    elif leaf.endswith("bias"):
        values = 0.05 * rng.standard_normal(shape)
    else:
        raise KeyError(f"no seeded rule for ViT state-dict key '{key}' {shape}")
    return values.astype(np.float32)


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """``{key: seeded_tensor(key, shape, seed)}`` for every key of ``shapes``."""
    return {key: seeded_tensor(key, tuple(shape), seed) for key, shape in shapes.items()}


def write_snapshot(folder, seed: int = 0):
    """OpenAI's ViT-B/32 as a Hugging Face snapshot directory with the seeded vision weights:
    transformers' config.json for ``CLIPConfig()`` and a model.safetensors holding the vision
    tower and its projection (the text tower, which the pipeline leaves unread, is left out).
    Returns the folder. Needs this package (its safetensors writer), unlike the rest here."""
    import json
    from pathlib import Path

    from pipeline.models import safetensors

    saved = json.loads((Path(__file__).parent / "clip_state_dict.json").read_text())
    shapes = {k: tuple(v["shape"]) for k, v in saved["keys"].items()
              if k.startswith("vision_model.") or k == "visual_projection.weight"}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(saved["config"], indent=2))
    safetensors.write(folder / "model.safetensors", seeded_state_dict(shapes, seed),
                      metadata={"format": "pt"})
    return folder
