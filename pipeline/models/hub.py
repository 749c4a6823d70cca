"""Where a model's files are, as Hugging Face lays them out: a snapshot folder (``config.json``
beside ``model.safetensors``), the hub cache's folder for a model, or one weights file; and the
JSON configs beside the weights. Shared by the factories that read hub downloads
(:mod:`pipeline.models.clip`, :mod:`pipeline.models.timm_vit`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.model import ModelError


def weights_file(path: Path, what: str, hint: str) -> Path:
    """The ``.safetensors`` file that ``--model`` names: ``path`` itself, a snapshot folder's
    ``model.safetensors`` (or its only ``.safetensors`` file), or that of the snapshot a hub
    cache folder (``models--org--name/``) points to. ``what``/``hint`` word the errors."""
    if (path / "snapshots").is_dir():
        path = _cached_snapshot(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelError(f"No {what} weights at '{path}'. {hint}")
    weights = path / "model.safetensors"
    if weights.is_file():
        return weights
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) != 1:
        why = ("holds no model.safetensors" if not found
               else f"holds several .safetensors files ({', '.join(found)}); name one")
        pickle = " (pytorch_model.bin is a pickle, which is not read)" if (
            path / "pytorch_model.bin").exists() else ""
        raise ModelError(f"'{path}' {why}{pickle}. {hint}")
    return path / found[0]


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"Cannot read '{path}': {e}.") from e
    if not isinstance(data, dict):
        raise ModelError(f"'{path}' holds a JSON {type(data).__name__}, expected an object.")
    return data


def _cached_snapshot(repo: Path) -> Path:
    """The snapshot of a Hugging Face cache folder (``huggingface-cli download`` without
    ``--local-dir`` leaves ``~/.cache/huggingface/hub/models--openai--clip-vit-base-patch32/``
    with ``refs/main`` naming the commit under ``snapshots/``)."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        return repo / "snapshots" / ref.read_text().strip()
    found = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if len(found) != 1:
        raise ModelError(
            f"'{repo}' is a Hugging Face cache folder with {len(found)} snapshots and no "
            "refs/main; pass one of its snapshots/ folders as --model.")
    return found[0]
