"""What the bench compares between contestants: each image's answer.

A classification model's answer is its top-1 label; two runs agree on an image when the labels
are equal. An embedding model's answer is its vector; two runs agree when the vectors' cosine
similarity is at least :data:`SAME_COSINE` (the same float32 program on other batch sizes or
devices differs by rounding only: ~1e-7 on CLIP ViT-B/32 here), or :data:`BF16_COSINE`
between float32 and bfloat16 (8 bits of mantissa).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SAME_COSINE = 0.999
BF16_COSINE = 0.99


def column(spec: Any) -> str:
    """The output column holding the answer: ``label`` or ``embedding``."""
    return "label" if spec.output == "classification" else "embedding"


def describe(spec: Any) -> str:
    return "top-1 labels" if spec.output == "classification" else "embeddings"


def of(outputs: dict[str, Any]) -> np.ndarray:
    """The answers in an Executor's outputs (``topk_labels`` or ``embedding``) or a
    Predictor's result columns (``label`` or ``embedding``): (B,) int or (B, D) float."""
    if "topk_labels" in outputs:
        return np.asarray(outputs["topk_labels"])[:, 0]
    if "label" in outputs:
        return np.asarray(outputs["label"])
    return np.asarray(outputs["embedding"], np.float32)


def agree(a: np.ndarray, b: np.ndarray, cosine: float = SAME_COSINE) -> np.ndarray:
    """(B,) bool: do rows of ``a`` and ``b`` give the same answer?"""
    if a.ndim == 1:
        return a == b
    return cosines(a, b) >= cosine


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) cosine similarity of each row pair; 0 where either row is zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
