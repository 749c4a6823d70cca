"""The Vision Transformer encoder in plain JAX (NHWC), shared by the model factories that load
published ViT weights (:mod:`pipeline.models.clip`).

The architecture is the original ViT's (Dosovitskiy et al. 2020) as torchvision, OpenAI's CLIP
and Hugging Face implement it: a patch conv (stride = patch size), a class token, learned
position embeddings, then pre-LayerNorm blocks (LN -> multi-head self-attention -> residual,
LN -> MLP -> residual), a final LayerNorm on the class token and a linear head. CLIP adds a
LayerNorm before the first block and a projection without bias as its head.

The blocks' weights are stacked along a leading layer axis and run with ``lax.scan``, so XLA
compiles one block, not 12 or 24 copies: each actor compiles once at start, and a ViT-L's
compile time would otherwise grow with its depth. Attention is ``jax.nn.dot_product_attention``,
which XLA lowers to cuDNN's fused attention on GPUs that have it. LayerNorms run in float32
(their params stay float32 under ``--compute-dtype bfloat16``) and cast back to the stream's
dtype, so a bfloat16 model stays bfloat16 between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

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
    """(B, image, image, 3) normalised -> (B, K): the head's output for the class token."""
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
        y = y + a @ p["out"]["w"] + p["out"]["b"]
        h = _layer_norm(y, p["norm2"], arch.eps)
        h = _activation(h @ p["fc1"]["w"] + p["fc1"]["b"], arch.activation)  # (B, T, M)
        return y + h @ p["fc2"]["w"] + p["fc2"]["b"], None

    y, _ = lax.scan(block, y, params["blocks"])
    pooled = _layer_norm(y[:, 0], params["norm"], arch.eps)  # (B, D): the class token
    out = pooled @ params["head"]["w"]  # (B, K)
    if "b" in params["head"]:
        out = out + params["head"]["b"]
    if arch.unit_output:
        out = out / jnp.linalg.norm(out.astype(jnp.float32), axis=-1, keepdims=True).astype(
            out.dtype)
    return out


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
