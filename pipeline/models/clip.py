"""CLIP image embeddings: OpenAI's and LAION's CLIP vision towers, from the Hugging Face files
users download, as unit-length vectors (a dot product is the cosine similarity).

``batch-infer run --model-fn pipeline.models.clip:build --model clip-vit-base-patch32/ ...``

``--model`` is a Hugging Face snapshot directory (``config.json`` and ``model.safetensors``,
as ``huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`` leaves them), the
hub cache's folder for the model (``models--openai--clip-vit-base-patch32``), or a
``.safetensors`` file. Both the whole ``CLIPModel`` checkpoint (the text tower is left
unread) and a ``CLIPVisionModelWithProjection`` one load. The architecture is transformers'
``CLIPVisionTransformer`` (:mod:`pipeline.models.vit` with CLIP's extra LayerNorm before the
blocks), then ``visual_projection``: ``get_image_features``, normalised.

What the weights do not say comes from ``config.json`` (``vision_config`` in a ``CLIPModel``'s):
the number of heads, the activation (OpenAI's models use ``quick_gelu``, LAION's ``gelu``) and
LayerNorm's epsilon, with transformers' defaults for a key the file leaves out (``save_pretrained``
writes only values that differ from them). A bare ``.safetensors`` file with no ``config.json``
beside it is read with those defaults and 64-wide heads (every OpenAI CLIP: B/32, B/16, L/14).

Preprocessing is OpenAI's ``preprocess``: shorter side to the input size (bicubic), center crop
(offsets rounded as torchvision's ``CenterCrop``, which transformers' processor floors, so an
image whose sides differ by an odd number may sit one pixel apart), CLIP's mean/std, or the
``image_mean``/``image_std`` of a ``preprocessor_config.json`` beside the weights.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import Model, ModelError, ModelSpec
from pipeline.models import hub, safetensors, vit

# OpenAI's CLIP normalisation (clip/clip.py, _transform), which transformers' processor copies.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' CLIPVisionConfig defaults: what config.json leaves out means these.
CONFIG_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
HEAD_WIDTH = 64  # every OpenAI CLIP's; used only where no config.json says the head count
VISION = "vision_model."
PROJECTION = "visual_projection.weight"
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # transformers' names -> ours
DOWNLOAD_HINT = (
    "CLIP needs its Hugging Face files (--model DIR holding config.json and model.safetensors): "
    "huggingface-cli download openai/clip-vit-base-patch32 --include config.json "
    "model.safetensors preprocessor_config.json --local-dir clip-vit-base-patch32 (or any CLIP "
    "in transformers' format, e.g. laion/CLIP-ViT-B-32-laion2B-s34B-b79K)."
)


def build(path: str | None) -> Model:
    """Model factory: CLIP image embeddings from the snapshot directory or file at ``path``."""
    if path is None:
        raise ModelError(DOWNLOAD_HINT)
    weights, config, processor = _files(Path(path))
    arch, params = load(weights, config)
    mean, std = CLIP_MEAN, CLIP_STD
    if processor is not None:
        mean, std = _normalisation(processor)
    spec = ModelSpec(
        height=arch.image, width=arch.image, channels=3,
        output="embedding", embedding_dim=params["head"]["w"].shape[1],
        mean=mean, std=std,
        resize="center_crop", crop_fraction=1.0, interpolation="bicubic",
    )
    name = f"clip-vit-{_size_name(arch)}-{arch.patch}"
    return Model(apply=functools.partial(vit.apply, arch=arch), params=params, spec=spec,
                 name=name)


def load(weights: str | os.PathLike, config: dict[str, Any] | None = None
         ) -> tuple[vit.Arch, dict[str, Any]]:
    """The vision tower of the CLIP checkpoint at ``weights``: its architecture and float32
    params for :func:`pipeline.models.vit.apply`. ``config``: the vision part of config.json."""
    state = safetensors.read(weights, keep=lambda k: k.startswith(VISION) or k == PROJECTION)
    if not state:
        raise ModelError(
            f"'{weights}' holds no CLIP vision tower (no '{VISION}*' or '{PROJECTION}' "
            f"tensors). {DOWNLOAD_HINT}"
        )
    arch = architecture(state, config or {}, weights)
    problems = check_state_dict(state, arch)
    if problems:
        raise ModelError(f"'{weights}' is not a CLIP vision tower: " + "; ".join(problems) + ".")
    return arch, convert(state, arch)


def architecture(state: dict[str, np.ndarray], config: dict[str, Any], where) -> vit.Arch:
    """The architecture the tensors' shapes and config.json describe, or ModelError if they
    disagree."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ModelError(f"'{where}' is not a CLIP vision tower: it has no '{key}'.")
        return tuple(state[key].shape)

    dim, _, patch, _ = shape(f"{VISION}embeddings.patch_embedding.weight")  # (D, 3, p, p)
    tokens = shape(f"{VISION}embeddings.position_embedding.weight")[0]
    side = round((tokens - 1) ** 0.5)
    layers = 1 + max((int(k.split(".")[3]) for k in state
                      if k.startswith(f"{VISION}encoder.layers.")), default=-1)
    mlp = shape(f"{VISION}encoder.layers.0.mlp.fc1.weight")[0] if layers else 0
    found = {"hidden_size": dim, "patch_size": patch, "image_size": side * patch,
             "num_hidden_layers": layers, "intermediate_size": mlp}
    if side * side + 1 != tokens:
        raise ModelError(f"'{where}' is not a CLIP vision tower: {tokens} position embeddings "
                         "are not a square grid of patches plus the class token.")
    disagree = [f"{k} {config[k]} (the weights: {v})" for k, v in found.items()
                if k in config and config[k] != v]
    heads = config.get("num_attention_heads", max(1, dim // HEAD_WIDTH))
    if not heads or dim % heads:
        disagree.append(f"num_attention_heads {heads} does not divide hidden_size {dim}")
    act = config.get("hidden_act", CONFIG_DEFAULTS["hidden_act"])
    if act not in _ACTIVATIONS:
        disagree.append(f"hidden_act {act!r} (supported: {', '.join(_ACTIVATIONS)})")
    if disagree:
        raise ModelError(f"'{where}' and its config.json disagree: " + "; ".join(disagree) + ".")
    return vit.Arch(
        patch=patch, dim=dim, layers=layers, heads=heads, mlp=mlp, image=side * patch,
        activation=_ACTIVATIONS[act],
        eps=float(config.get("layer_norm_eps", CONFIG_DEFAULTS["layer_norm_eps"])),
        pre_norm=True, unit_output=True,
    )


def state_dict_shapes(arch: vit.Arch, projection: int) -> dict[str, tuple[int, ...]]:
    """Every vision key of transformers' CLIP state dict and its shape, in its order."""
    d = arch.dim
    e = f"{VISION}embeddings."
    shapes = {
        f"{e}class_embedding": (d,),
        f"{e}patch_embedding.weight": (d, 3, arch.patch, arch.patch),
        f"{e}position_embedding.weight": (arch.tokens, d),
        f"{VISION}pre_layrnorm.weight": (d,), f"{VISION}pre_layrnorm.bias": (d,),
    }
    for i in range(arch.layers):
        layer = f"{VISION}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        shapes[f"{layer}layer_norm1.weight"] = shapes[f"{layer}layer_norm1.bias"] = (d,)
        shapes[f"{layer}mlp.fc1.weight"] = (arch.mlp, d)
        shapes[f"{layer}mlp.fc1.bias"] = (arch.mlp,)
        shapes[f"{layer}mlp.fc2.weight"], shapes[f"{layer}mlp.fc2.bias"] = (d, arch.mlp), (d,)
        shapes[f"{layer}layer_norm2.weight"] = shapes[f"{layer}layer_norm2.bias"] = (d,)
    shapes[f"{VISION}post_layernorm.weight"] = shapes[f"{VISION}post_layernorm.bias"] = (d,)
    shapes[PROJECTION] = (projection, d)
    return shapes


def check_state_dict(state: dict[str, np.ndarray], arch: vit.Arch) -> list[str]:
    """Every missing, unexpected, misshapen, non-float or non-finite tensor; empty if it fits."""
    if PROJECTION not in state:
        return [(f"1 missing: '{PROJECTION}' (a CLIPVisionModel without projection has no "
                 "embedding space shared with text; use the CLIPModel or "
                 "CLIPVisionModelWithProjection checkpoint)")]
    # transformers before 4.31 stored position_ids as a buffer; it is arange(tokens).
    return vit.check_tensors(state, state_dict_shapes(arch, state[PROJECTION].shape[0]),
                             ignored=frozenset({f"{VISION}embeddings.position_ids"}))


def convert(state: dict[str, np.ndarray], arch: vit.Arch) -> dict[str, Any]:
    """A checked state dict -> :func:`pipeline.models.vit.apply` params, float32: torch's
    (out, in) linears transposed to (in, out), the patch conv to HWIO, q/k/v fused."""
    def f32(key: str) -> np.ndarray:
        return np.asarray(state[key], np.float32)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": f32(f"{prefix}.weight"), "bias": f32(f"{prefix}.bias")}

    blocks = []
    for i in range(arch.layers):
        p = f"{VISION}encoder.layers.{i}."
        qkv = [f"{p}self_attn.{t}_proj" for t in ("q", "k", "v")]
        blocks.append({
            "norm1.scale": f32(f"{p}layer_norm1.weight"), "norm1.bias": f32(f"{p}layer_norm1.bias"),
            "qkv.w": np.concatenate([f32(f"{t}.weight").T for t in qkv], axis=1),  # (D, 3D)
            "qkv.b": np.concatenate([f32(f"{t}.bias") for t in qkv]),  # (3D,)
            "out.w": f32(f"{p}self_attn.out_proj.weight").T,
            "out.b": f32(f"{p}self_attn.out_proj.bias"),
            "norm2.scale": f32(f"{p}layer_norm2.weight"), "norm2.bias": f32(f"{p}layer_norm2.bias"),
            "fc1.w": f32(f"{p}mlp.fc1.weight").T, "fc1.b": f32(f"{p}mlp.fc1.bias"),  # (D, M)
            "fc2.w": f32(f"{p}mlp.fc2.weight").T, "fc2.b": f32(f"{p}mlp.fc2.bias"),  # (M, D)
        })
    e = f"{VISION}embeddings."
    return {
        "patch": {"w": f32(f"{e}patch_embedding.weight").transpose(2, 3, 1, 0).copy()},  # HWIO
        "cls": f32(f"{e}class_embedding"),  # (D,)
        "pos": f32(f"{e}position_embedding.weight"),  # (T, D)
        "pre_norm": norm(f"{VISION}pre_layrnorm"),
        "blocks": vit.stack_blocks(blocks),
        "norm": norm(f"{VISION}post_layernorm"),
        "head": {"w": f32(PROJECTION).T.copy()},  # (D, P)
    }


def _files(path: Path) -> tuple[Path, dict | None, dict | None]:
    """(weights file, vision config or None, preprocessor config or None) for ``--model``."""
    weights = hub.weights_file(path, "CLIP", DOWNLOAD_HINT)
    config = hub.read_json(weights.parent / "config.json")
    if config is not None:
        config = config.get("vision_config", config)  # CLIPModel nests it; the vision model not
    return weights, config, hub.read_json(weights.parent / "preprocessor_config.json")


def _normalisation(processor: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(processor.get("image_mean", CLIP_MEAN))
    std = tuple(processor.get("image_std", CLIP_STD))
    return mean, std


def _size_name(arch: vit.Arch) -> str:
    """The usual names of ViT widths (B, L, H), else the width itself."""
    return {768: "b", 1024: "l", 1280: "h"}.get(arch.dim, f"d{arch.dim}")
