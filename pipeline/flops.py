"""What a model's program costs in FLOPs, counted from its jaxpr with loops multiplied out.

The plan sizes a GPU's device batch from the FLOPs per image (:mod:`pipeline.plan`). XLA's
cost analysis of the lowered program (and ``jax.experimental.roofline``) counts a loop's body
once: a transformer whose blocks run under ``lax.scan`` (``pipeline.models.vit``, Flax's
``nn.scan``) is undercounted by its depth. Measured on CLIP ViT-B/32: XLA 0.95 GFLOPs per
image for the scanned program, 8.84 for the same program unrolled. So the matrix products and
convolutions, which are nearly all of a vision model's work, are counted here, each scan's
body times its length, and :func:`pipeline.model.check_model` takes the larger of this and
XLA's estimate (XLA's also counts elementwise work).
"""

from __future__ import annotations

import math
from typing import Any


def matmul_flops(jaxpr: Any) -> float:
    """2 x multiply-adds of every ``dot_general`` and ``conv_general_dilated`` in ``jaxpr``
    (a Jaxpr or ClosedJaxpr), inner jaxprs included: a scan's body times its length, the
    costliest branch of a ``cond``, a ``while`` body once (its trip count is not known)."""
    from jax.extend import core

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * _size(eqn.outvars[0]) * math.prod(lhs[d] for d in contracting)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            # The kernel's input features (already divided by the groups) x its window.
            per_output = math.prod(rhs[d] for d in eqn.params["dimension_numbers"].rhs_spec[1:])
            total += 2.0 * _size(eqn.outvars[0]) * per_output
        else:
            inner = [matmul_flops(j) for j in core.jaxprs_in_params(eqn.params)]
            if name == "cond":
                total += max(inner, default=0.0)
            else:
                total += eqn.params.get("length", 1) * sum(inner) if name == "scan" else sum(inner)
    return total


def _size(var: Any) -> int:
    return math.prod(var.aval.shape)
