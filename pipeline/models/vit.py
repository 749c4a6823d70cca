"""Vision Transformers in plain JAX (NHWC): the encoder shared by the factories that load
published ViT weights (:mod:`pipeline.models.clip`, :mod:`pipeline.models.timm_vit`), and
torchvision's ImageNet ViTs.

``batch-infer run --model-fn pipeline.models.vit:build --model vit_b_16.safetensors ...``
(``build_swag`` for torchvision's SWAG weights; :mod:`pipeline.models.clip` for CLIP).

The architecture is the original ViT's (Dosovitskiy et al. 2020) as torchvision, OpenAI's CLIP
and Hugging Face implement it: a patch conv (stride = patch size), a class token, learned
position embeddings, then pre-LayerNorm blocks (LN -> multi-head self-attention -> residual,
LN -> MLP -> residual), a final LayerNorm on the class token and a linear head. CLIP adds a
LayerNorm before the first block and a projection without bias as its head; timm's variants
may pool the patches' mean instead of the class token, scale each branch (layer scale), or
have no head (the pooled features are the output).

The blocks' weights are stacked along a leading layer axis and run with ``lax.scan``, so XLA
compiles one block, not 12 or 24 copies: each actor compiles once at start, and a ViT-L's
compile time would otherwise grow with its depth. Attention is ``jax.nn.dot_product_attention``,
which XLA lowers to cuDNN's fused attention on GPUs that have it. LayerNorms run in float32
(their params stay float32 under ``--compute-dtype bfloat16``) and cast back to the stream's
dtype, so a bfloat16 model stays bfloat16 between them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.model import Model, ModelError, ModelSpec
from pipeline.models import safetensors
from pipeline.models.resnet import NUM_CLASSES, imagenet_classes

Activation = Literal["gelu", "quick_gelu"]


@dataclass(frozen=True)
class Arch:
    """What the weights' shapes do not say, and what they do (checked against each other)."""

    patch: int  # square patches, stride = patch
    dim: int  # token width D
    layers: int
    heads: int  # D // heads is each head's width
    mlp: int  # MLP hidden width
    image: int  # square input side; (image / patch)^2 + 1 tokens
    activation: Activation = "gelu"
    eps: float = 1e-6
    pre_norm: bool = False  # CLIP's LayerNorm before the first block
    unit_output: bool = False  # L2-normalise the head's output (CLIP embeddings)
    pool: Literal["token", "avg"] = "token"  # the class token, or the mean of the patches

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


def block_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Our stacked block params: name -> shape with the leading layer axis."""
    d, m, n = arch.dim, arch.mlp, arch.layers
    return {
        "norm1.scale": (n, d), "norm1.bias": (n, d),
        "qkv.w": (n, d, 3 * d), "qkv.b": (n, 3 * d),
        "out.w": (n, d, d), "out.b": (n, d),
        "norm2.scale": (n, d), "norm2.bias": (n, d),
        "fc1.w": (n, d, m), "fc1.b": (n, m),
        "fc2.w": (n, m, d), "fc2.b": (n, d),
    }


def stack_blocks(blocks: list[dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer ``{"norm1.scale": ..., "qkv.w": ...}`` -> ``{"norm1": {"scale": (L, D)}, ...}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in blocks[0]:
        layer, leaf = name.split(".")
        out.setdefault(layer, {})[leaf] = np.stack([b[name] for b in blocks]).astype(np.float32)
    return out


def apply(params: dict[str, Any], x, *, arch: Arch):
    """(B, image, image, 3) normalised -> (B, K): the head's output for the class token (or
    the patches' mean); without a ``head`` in ``params``, the pooled features (B, D). A block
    with ``ls1``/``ls2`` scales its branches (layer scale)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    b = x.shape[0]
    y = lax.conv_general_dilated(
        x, params["patch"]["w"], (arch.patch, arch.patch), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # (B, image/p, image/p, D)
    y = y.reshape(b, -1, arch.dim)
    if "b" in params["patch"]:
        y = y + params["patch"]["b"]
    cls = jnp.broadcast_to(params["cls"].astype(y.dtype), (b, 1, arch.dim))
    y = jnp.concatenate([cls, y], axis=1) + params["pos"]  # (B, T, D)
    if arch.pre_norm:
        y = _layer_norm(y, params["pre_norm"], arch.eps)

    def block(y, p):  # y: (B, T, D)
        h = _layer_norm(y, p["norm1"], arch.eps)
        qkv = h @ p["qkv"]["w"] + p["qkv"]["b"]  # (B, T, 3D)
        q, k, v = (t.reshape(b, -1, arch.heads, arch.dim // arch.heads)
                   for t in jnp.split(qkv, 3, axis=-1))  # (B, T, heads, D/heads)
        a = jax.nn.dot_product_attention(q, k, v).reshape(b, -1, arch.dim)  # (B, T, D)
        y = y + _scaled(a @ p["out"]["w"] + p["out"]["b"], p.get("ls1"))
        h = _layer_norm(y, p["norm2"], arch.eps)
        h = _activation(h @ p["fc1"]["w"] + p["fc1"]["b"], arch.activation)  # (B, T, M)
        return y + _scaled(h @ p["fc2"]["w"] + p["fc2"]["b"], p.get("ls2")), None

    y, _ = lax.scan(block, y, params["blocks"])
    pooled = y[:, 1:].mean(axis=1) if arch.pool == "avg" else y[:, 0]  # (B, D)
    out = _layer_norm(pooled, params["norm"], arch.eps)
    if "head" in params:
        out = out @ params["head"]["w"]  # (B, K)
        if "b" in params["head"]:
            out = out + params["head"]["b"]
    if arch.unit_output:
        out = out / jnp.linalg.norm(out.astype(jnp.float32), axis=-1, keepdims=True).astype(
            out.dtype)
    return out


def _scaled(branch, scale: dict[str, Any] | None):
    return branch if scale is None else branch * scale["gamma"]


def _layer_norm(y, p: dict[str, Any], eps: float):
    import jax.numpy as jnp

    y32 = y.astype(jnp.float32)
    mean = y32.mean(axis=-1, keepdims=True)
    var = jnp.square(y32 - mean).mean(axis=-1, keepdims=True)
    return ((y32 - mean) * (1.0 / jnp.sqrt(var + eps)) * p["scale"] + p["bias"]).astype(y.dtype)


def _activation(h, kind: Activation):
    import jax

    if kind == "quick_gelu":  # OpenAI CLIP's sigmoid approximation; its weights expect it
        return h * jax.nn.sigmoid(1.702 * h)
    return jax.nn.gelu(h, approximate=False)  # torch.nn.GELU()'s default, the exact erf form


def check_tensors(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                  ignored: frozenset[str] = frozenset()) -> list[str]:
    """Every missing, unexpected (outside ``ignored``), misshapen, non-float or non-finite
    tensor of ``state`` against ``expected`` shapes; empty if it fits. A well-formed file can
    still hold garbage (a failed export, a diverged run): NaN weights would only surface as NaN
    rows, so they are named here."""
    present = [k for k in expected if k in state]
    groups = (
        ("missing", [f"'{k}'" for k in expected if k not in state]),
        ("unexpected", [f"'{k}'" for k in state if k not in expected and k not in ignored]),
        ("misshapen", [f"'{k}' {tuple(state[k].shape)} (expected {expected[k]})"
                       for k in present if tuple(state[k].shape) != expected[k]]),
        ("not float", [f"'{k}' {state[k].dtype}" for k in present
                       if not safetensors.is_float(state[k])]),
        ("non-finite", [f"'{k}'" for k in present
                        if safetensors.is_float(state[k]) and not np.isfinite(state[k]).all()]),
    )
    return [f"{len(items)} {label}: " + ", ".join(items) for label, items in groups if items]


# --- torchvision's ViTs ------------------------------------------------------------------------

# Heads per width in torchvision's vit_b_*, vit_l_* and vit_h_14 (the state dict does not say).
TORCHVISION_HEADS = {768: 12, 1024: 16, 1280: 16}
TORCHVISION_EPS = 1e-6  # torchvision's ViT: partial(nn.LayerNorm, eps=1e-6)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXPORT_HINT = (
    "A torchvision ViT needs its state dict in safetensors format (--model vit_b_16.safetensors);"
    " export one where torch is installed: python -c \"import torchvision; from safetensors.torch"
    " import save_file; save_file(torchvision.models.vit_b_16(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vit_b_16.safetensors')\" (pip install torch torchvision safetensors); "
    "vit_b_32, vit_l_16 and vit_l_32 likewise; SWAG weights (IMAGENET1K_SWAG_*) with "
    "pipeline.models.vit:build_swag."
)


def build(path: str | None) -> Model:
    """Model factory: a torchvision ViT with its ``IMAGENET1K_V1`` weights (vit_b_16, vit_b_32,
    vit_l_16, vit_l_32) as a .safetensors state dict; torchvision's evaluation transform for
    them: shorter side to 256 (242 for vit_l_16), bilinear, center 224x224, ImageNet mean/std."""
    arch, params = _load_torchvision(path)
    resize = 242 if (arch.dim, arch.patch) == (1024, 16) else 256
    return _imagenet_model(arch, params, crop_fraction=arch.image / resize,
                           interpolation="bilinear")


def build_swag(path: str | None) -> Model:
    """Model factory: a torchvision ViT with SWAG weights (``IMAGENET1K_SWAG_E2E_V1``: vit_b_16
    at 384, vit_l_16 at 512, vit_h_14 at 518; ``IMAGENET1K_SWAG_LINEAR_V1`` at 224);
    torchvision's transform for them: shorter side to the input size, bicubic, center crop."""
    arch, params = _load_torchvision(path)
    return _imagenet_model(arch, params, crop_fraction=1.0, interpolation="bicubic")


def _imagenet_model(arch: Arch, params: dict[str, Any], **resize: Any) -> Model:
    spec = ModelSpec(height=arch.image, width=arch.image, channels=3,
                     class_names=imagenet_classes(), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resize="center_crop", **resize)
    size = {768: "b", 1024: "l", 1280: "h"}[arch.dim]
    return Model(apply=functools.partial(apply, arch=arch), params=params, spec=spec,
                 name=f"vit_{size}_{arch.patch}")


def _load_torchvision(path: str | os.PathLike | None) -> tuple[Arch, dict[str, Any]]:
    if path is None:
        raise ModelError(EXPORT_HINT)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"No ViT weights at '{path}'. {EXPORT_HINT}")
    state = safetensors.read_state_dict(path)  # a DDP wrapper's "module." prefix dropped
    arch = torchvision_architecture(state, path)
    problems = check_tensors(state, torchvision_shapes(arch))
    if problems:
        raise ModelError(f"'{path}' is not a torchvision ViT state dict: " + "; ".join(problems)
                         + ".")
    return arch, convert_torchvision(state, arch)


def torchvision_architecture(state: dict[str, np.ndarray], where) -> Arch:
    """The architecture torchvision's state-dict shapes describe, or ModelError."""
    bad = f"'{where}' is not a torchvision ViT state dict"
    for key in ("conv_proj.weight", "encoder.pos_embedding",
                "encoder.layers.encoder_layer_0.mlp.0.weight"):
        if key not in state:
            raise ModelError(f"{bad}: it has no '{key}'. {EXPORT_HINT}")
    dim, _, patch, _ = state["conv_proj.weight"].shape  # (D, 3, p, p)
    tokens = state["encoder.pos_embedding"].shape[1]  # (1, T, D)
    side = round((tokens - 1) ** 0.5)
    if side * side + 1 != tokens or dim not in TORCHVISION_HEADS:
        raise ModelError(f"{bad}: width {dim} and {tokens} position embeddings are none of "
                         "vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14.")
    layers = 1 + max(int(k.split(".")[2].removeprefix("encoder_layer_"))
                     for k in state if k.startswith("encoder.layers.encoder_layer_"))
    return Arch(patch=patch, dim=dim, layers=layers, heads=TORCHVISION_HEADS[dim],
                mlp=state["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0],
                image=side * patch, activation="gelu", eps=TORCHVISION_EPS)


def torchvision_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's ViT state dict and its shape, in its order."""
    d, m = arch.dim, arch.mlp
    shapes = {"class_token": (1, 1, d), "conv_proj.weight": (d, 3, arch.patch, arch.patch),
              "conv_proj.bias": (d,), "encoder.pos_embedding": (1, arch.tokens, d)}
    for i in range(arch.layers):
        p = f"encoder.layers.encoder_layer_{i}."
        shapes.update({
            f"{p}ln_1.weight": (d,), f"{p}ln_1.bias": (d,),
            f"{p}self_attention.in_proj_weight": (3 * d, d),
            f"{p}self_attention.in_proj_bias": (3 * d,),
            f"{p}self_attention.out_proj.weight": (d, d), f"{p}self_attention.out_proj.bias": (d,),
            f"{p}ln_2.weight": (d,), f"{p}ln_2.bias": (d,),
            f"{p}mlp.0.weight": (m, d), f"{p}mlp.0.bias": (m,),
            f"{p}mlp.3.weight": (d, m), f"{p}mlp.3.bias": (d,),
        })
    shapes.update({"encoder.ln.weight": (d,), "encoder.ln.bias": (d,),
                   "heads.head.weight": (NUM_CLASSES, d), "heads.head.bias": (NUM_CLASSES,)})
    return shapes


def convert_torchvision(state: dict[str, np.ndarray], arch: Arch) -> dict[str, Any]:
    """A checked torchvision state dict -> :func:`apply` params, float32: (out, in) linears
    transposed to (in, out), the patch conv to HWIO; ``in_proj`` is already q, k, v fused."""
    def f32(key: str) -> np.ndarray:
        return np.asarray(state[key], np.float32)

    blocks = []
    for i in range(arch.layers):
        p = f"encoder.layers.encoder_layer_{i}."
        a = f"{p}self_attention."
        blocks.append({
            "norm1.scale": f32(f"{p}ln_1.weight"), "norm1.bias": f32(f"{p}ln_1.bias"),
            "qkv.w": f32(f"{a}in_proj_weight").T, "qkv.b": f32(f"{a}in_proj_bias"),  # (D, 3D)
            "out.w": f32(f"{a}out_proj.weight").T, "out.b": f32(f"{a}out_proj.bias"),
            "norm2.scale": f32(f"{p}ln_2.weight"), "norm2.bias": f32(f"{p}ln_2.bias"),
            "fc1.w": f32(f"{p}mlp.0.weight").T, "fc1.b": f32(f"{p}mlp.0.bias"),  # (D, M)
            "fc2.w": f32(f"{p}mlp.3.weight").T, "fc2.b": f32(f"{p}mlp.3.bias"),  # (M, D)
        })
    return {
        "patch": {"w": f32("conv_proj.weight").transpose(2, 3, 1, 0).copy(),  # HWIO
                  "b": f32("conv_proj.bias")},
        "cls": f32("class_token").reshape(-1),  # (D,)
        "pos": f32("encoder.pos_embedding")[0],  # (T, D)
        "blocks": stack_blocks(blocks),
        "norm": {"scale": f32("encoder.ln.weight"), "bias": f32("encoder.ln.bias")},
        "head": {"w": f32("heads.head.weight").T.copy(), "b": f32("heads.head.bias")},
    }
