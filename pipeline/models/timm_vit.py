"""timm's Vision Transformers (``vit_*``, ``deit_*``, ``deit3_*``), from the files timm's models
on the Hugging Face hub ship, on the encoder of :mod:`pipeline.models.vit`.

``batch-infer run --model-fn pipeline.models.timm_vit:build --model vit_base_patch16_224/ ...``

``--model`` is the snapshot directory (``config.json`` and ``model.safetensors``, as
``huggingface-cli download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`` or timm's
``save_for_hf`` leave them), the hub cache's folder for the model, or a ``.safetensors``
state dict (``save_file(model.state_dict(), ...)``), with a ``config.json`` beside it or not
(:mod:`pipeline.models.hub`).

The architecture is read from the weights: class-token or average pooling (``fc_norm``), a
LayerNorm before the blocks (``norm_pre``, timm's CLIP-style ViTs), layer scale (``ls1``,
``ls2``: DeiT III), a patch conv with or without bias, no head (``num_classes=0``: the pooled
features are an embedding). Register tokens and per-head q/k norms are refused, one error
listing the keys. Heads are ``model_args.num_heads`` in config.json, else 64 wide (every
``vit_*``/``deit_*`` of timm); the activation is exact GELU (``quick_gelu`` for the
``*_quickgelu_*`` architectures); LayerNorm's epsilon 1e-6, timm's.

Preprocessing is timm's evaluation transform from config.json's ``pretrained_cfg``
(``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``): shorter
side to ``floor(size / crop_pct)``, center crop. Without a config.json, the defaults of timm's
default ``vit_*`` weights (augreg): bicubic, ``crop_pct`` 0.9, mean and std 0.5. A head of
1000 classes is labelled with the ImageNet-1k names; another with config.json's
``label_names``, else with class numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import Model, ModelError, ModelSpec
from pipeline.models import hub, safetensors, vit
from pipeline.models.resnet import imagenet_classes

# timm's default vit_* weights (augreg): what a state dict without config.json is taken for.
DEFAULT_CFG = {"interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
HEAD_WIDTH = 64
EPS = 1e-6  # timm's ViT: partial(nn.LayerNorm, eps=1e-6)
_INTERPOLATION = {"bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"}
DOWNLOAD_HINT = (
    "A timm ViT needs its weights (--model DIR holding config.json and model.safetensors): "
    "huggingface-cli download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --local-dir "
    "vit_base_patch16_224, or export one where timm is installed: python -c \"import timm; "
    "from timm.models import save_for_hf; save_for_hf(timm.create_model("
    "'vit_base_patch16_224', pretrained=True), 'vit_base_patch16_224', "
    "safe_serialization=True)\"."
)


def build(path: str | None) -> Model:
    """Model factory: a timm ViT from the snapshot directory or state dict at ``path``."""
    if path is None:
        raise ModelError(DOWNLOAD_HINT)
    weights, config = _files(Path(path))
    state = safetensors.read_state_dict(weights)  # a DDP wrapper's "module." prefix dropped
    arch = architecture(state, config, weights)
    problems = vit.check_tensors(state, state_dict_shapes(arch, state))
    if problems:
        raise ModelError(f"'{weights}' is not a timm ViT state dict: " + "; ".join(problems)
                         + ".")
    params = convert(state, arch)
    cfg = {**DEFAULT_CFG, **config.get("pretrained_cfg", {})}
    spec = _spec(arch, cfg, config, params, weights)
    name = config.get("architecture") or f"vit_d{arch.dim}_patch{arch.patch}"
    return Model(apply=functools.partial(vit.apply, arch=arch), params=params, spec=spec,
                 name=name)


def architecture(state: dict[str, np.ndarray], config: dict[str, Any], where) -> vit.Arch:
    bad = f"'{where}' is not a timm ViT state dict"
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ModelError(f"{bad}: it has no '{key}' (timm ViTs with a class token only).")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    tokens = state["pos_embed"].shape[1]  # (1, T, D)
    side = round((tokens - 1) ** 0.5)
    heads = config.get("model_args", {}).get("num_heads", max(1, dim // HEAD_WIDTH))
    if side * side + 1 != tokens:
        raise ModelError(f"{bad}: {tokens} position embeddings are not a square grid of "
                         "patches plus the class token.")
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ModelError(f"{bad}: num_heads {heads!r} does not divide the width {dim}.")
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    quick = "quickgelu" in str(config.get("architecture", ""))
    return vit.Arch(patch=patch, dim=dim, layers=layers, heads=heads,
                    mlp=state["blocks.0.mlp.fc1.weight"].shape[0], image=side * patch,
                    activation="quick_gelu" if quick else "gelu", eps=EPS,
                    pre_norm="norm_pre.weight" in state,
                    pool="avg" if "fc_norm.weight" in state else "token")


def state_dict_shapes(arch: vit.Arch, state: dict[str, np.ndarray]) -> dict[str, tuple]:
    """The keys and shapes of a timm ViT of ``arch``, with the optional parts ``state`` has
    (patch bias, layer scale, head)."""
    d, m = arch.dim, arch.mlp
    shapes: dict[str, tuple] = {"cls_token": (1, 1, d), "pos_embed": (1, arch.tokens, d),
                                "patch_embed.proj.weight": (d, 3, arch.patch, arch.patch)}
    if "patch_embed.proj.bias" in state:
        shapes["patch_embed.proj.bias"] = (d,)
    if arch.pre_norm:
        shapes["norm_pre.weight"] = shapes["norm_pre.bias"] = (d,)
    scaled = "blocks.0.ls1.gamma" in state
    for i in range(arch.layers):
        b = f"blocks.{i}."
        shapes.update({
            f"{b}norm1.weight": (d,), f"{b}norm1.bias": (d,),
            f"{b}attn.qkv.weight": (3 * d, d), f"{b}attn.qkv.bias": (3 * d,),
            f"{b}attn.proj.weight": (d, d), f"{b}attn.proj.bias": (d,),
            f"{b}norm2.weight": (d,), f"{b}norm2.bias": (d,),
            f"{b}mlp.fc1.weight": (m, d), f"{b}mlp.fc1.bias": (m,),
            f"{b}mlp.fc2.weight": (d, m), f"{b}mlp.fc2.bias": (d,),
        })
        if scaled:
            shapes[f"{b}ls1.gamma"] = shapes[f"{b}ls2.gamma"] = (d,)
    final = "fc_norm" if arch.pool == "avg" else "norm"
    shapes[f"{final}.weight"] = shapes[f"{final}.bias"] = (d,)
    if "head.weight" in state:
        classes = state["head.weight"].shape[0]
        shapes["head.weight"], shapes["head.bias"] = (classes, d), (classes,)
    return shapes


def convert(state: dict[str, np.ndarray], arch: vit.Arch) -> dict[str, Any]:
    """A checked timm state dict -> :func:`pipeline.models.vit.apply` params, float32."""
    def f32(key: str) -> np.ndarray:
        return np.asarray(state[key], np.float32)

    blocks = []
    for i in range(arch.layers):
        b = f"blocks.{i}."
        block = {
            "norm1.scale": f32(f"{b}norm1.weight"), "norm1.bias": f32(f"{b}norm1.bias"),
            "qkv.w": f32(f"{b}attn.qkv.weight").T, "qkv.b": f32(f"{b}attn.qkv.bias"),  # (D, 3D)
            "out.w": f32(f"{b}attn.proj.weight").T, "out.b": f32(f"{b}attn.proj.bias"),
            "norm2.scale": f32(f"{b}norm2.weight"), "norm2.bias": f32(f"{b}norm2.bias"),
            "fc1.w": f32(f"{b}mlp.fc1.weight").T, "fc1.b": f32(f"{b}mlp.fc1.bias"),  # (D, M)
            "fc2.w": f32(f"{b}mlp.fc2.weight").T, "fc2.b": f32(f"{b}mlp.fc2.bias"),  # (M, D)
        }
        if f"{b}ls1.gamma" in state:
            block.update({"ls1.gamma": f32(f"{b}ls1.gamma"), "ls2.gamma": f32(f"{b}ls2.gamma")})
        blocks.append(block)
    final = "fc_norm" if arch.pool == "avg" else "norm"
    params: dict[str, Any] = {
        "patch": {"w": f32("patch_embed.proj.weight").transpose(2, 3, 1, 0).copy()},  # HWIO
        "cls": f32("cls_token").reshape(-1),  # (D,)
        "pos": f32("pos_embed")[0],  # (T, D)
        "blocks": vit.stack_blocks(blocks),
        "norm": {"scale": f32(f"{final}.weight"), "bias": f32(f"{final}.bias")},
    }
    if "patch_embed.proj.bias" in state:
        params["patch"]["b"] = f32("patch_embed.proj.bias")
    if arch.pre_norm:
        params["pre_norm"] = {"scale": f32("norm_pre.weight"), "bias": f32("norm_pre.bias")}
    if "head.weight" in state:
        params["head"] = {"w": f32("head.weight").T.copy(), "b": f32("head.bias")}
    return params


def _spec(arch: vit.Arch, cfg: dict[str, Any], config: dict[str, Any],
          params: dict[str, Any], where) -> ModelSpec:
    size = tuple(cfg.get("input_size", (3, arch.image, arch.image)))
    problems = []
    if size[1:] != (arch.image, arch.image):
        problems.append(f"pretrained_cfg.input_size {list(size)}, but the position "
                        f"embeddings are for {arch.image}x{arch.image}")
    if cfg["crop_mode"] not in ("center", "squash") or cfg["interpolation"] not in _INTERPOLATION:
        problems.append(f"crop_mode {cfg['crop_mode']!r} / interpolation "
                        f"{cfg['interpolation']!r} (supported: center or squash; "
                        f"{', '.join(sorted(_INTERPOLATION))})")
    if problems:
        raise ModelError(f"'{where}' and its config.json disagree: " + "; ".join(problems) + ".")
    crop = float(cfg["crop_pct"] or DEFAULT_CFG["crop_pct"])
    resize = ({"resize": "squash"} if cfg["crop_mode"] == "squash"
              else {"resize": "center_crop", "crop_fraction": crop})
    common = {"height": arch.image, "width": arch.image, "channels": 3,
              "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
              "interpolation": cfg["interpolation"], **resize}
    if "head" not in params:
        return ModelSpec(output="embedding", embedding_dim=arch.dim, **common)
    classes = params["head"]["w"].shape[1]
    names = config.get("label_names")
    if not names or len(names) != classes:
        names = imagenet_classes() if classes == 1000 else tuple(map(str, range(classes)))
    return ModelSpec(class_names=tuple(names), **common)


def _files(path: Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, config.json or {}) for ``--model``."""
    weights = hub.weights_file(path, "timm ViT", DOWNLOAD_HINT)
    return weights, hub.read_json(weights.parent / "config.json") or {}
