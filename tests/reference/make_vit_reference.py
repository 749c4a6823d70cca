"""Write the torchvision and timm references that ``tests/test_vit.py`` compares our JAX ViTs
with, so CI checks against torchvision and timm themselves without installing torch.

Run it (from the repository root) with torch and torchvision in a separate environment; never
add them to the project's dependencies::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch torchvision timm safetensors numpy
    /tmp/venv-torch/bin/python tests/reference/make_vit_reference.py

It writes, beside itself (about 300 KB):

- ``vit_b_16_state_dict.json``: every key, shape and dtype of torchvision's
  ``vit_b_16().state_dict()``, and the versions used;
- ``vit_b_16_reference.npz``: the logits of ``torchvision.models.vit_b_16()`` in eval mode,
  loaded with ``vit_weights.seeded_state_dict`` (seed ``WEIGHT_SEED``), for
  ``resnet_weights.reference_inputs(INPUT_SEED, COUNT, 224)``;
- ``timm_vit_small_state_dict.json`` and ``timm_vit_small_reference.npz``: the same for timm's
  ``vit_small_patch16_224`` (6 heads), with the ``config.json`` timm's ``save_for_hf`` writes
  for it;
- ``timm_tiny/``: a small timm ViT (average pooling with ``fc_norm``, layer scale, a LayerNorm
  before the blocks, no patch bias, 16-wide heads, 10 classes, 64x64) as ``save_for_hf``
  writes it, seeded
  likewise, and its logits in ``timm_tiny_reference.npz``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import resnet_weights  # beside this script, which Python puts first on sys.path
import timm
import torch
import torchvision
import vit_weights
from timm.models import save_for_hf

HERE = Path(__file__).resolve().parent

WEIGHT_SEED = 0
INPUT_SEED = 1
COUNT = 4


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    state = model.state_dict()
    lines = [
        f'  {json.dumps(k)}: {{"shape": {json.dumps(list(v.shape))}, '
        f'"dtype": "{str(v.dtype).removeprefix("torch.")}"}}'
        for k, v in state.items()
    ]
    (HERE / "vit_b_16_state_dict.json").write_text(
        "{\n"
        '"source": "torchvision.models.vit_b_16().state_dict()",\n'
        f'"torch": "{torch.__version__}", "torchvision": "{torchvision.__version__}",\n'
        '"keys": {\n' + ",\n".join(lines) + "\n}}\n"
    )
    weights = vit_weights.seeded_state_dict({k: tuple(v.shape) for k, v in state.items()},
                                            WEIGHT_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    inputs = resnet_weights.reference_inputs(INPUT_SEED, COUNT, 224)  # (N, 3, H, W)
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).numpy()  # (N, 1000)
    np.savez_compressed(HERE / "vit_b_16_reference.npz", logits=logits.astype(np.float32),
                        weight_seed=WEIGHT_SEED, input_seed=INPUT_SEED, count=COUNT, size=224)

    small = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    _write_keys(small, "timm_vit_small_state_dict.json",
                "timm.create_model('vit_small_patch16_224').state_dict()", timm.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(small, tmp, safe_serialization=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
    _timm_logits(small, 224, "timm_vit_small_reference.npz", config=json.dumps(config))

    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                             embed_dim=32, num_heads=2, mlp_ratio=2.0, global_pool="avg",
                             init_values=0.1, pre_norm=True, num_classes=10).eval()
    _timm_logits(tiny, 64, "timm_tiny_reference.npz")
    save_for_hf(tiny, HERE / "timm_tiny", safe_serialization=True)  # the seeded weights


def _write_keys(model, name: str, source: str, version: str) -> None:
    lines = [f'  {json.dumps(k)}: {{"shape": {json.dumps(list(v.shape))}, '
             f'"dtype": "{str(v.dtype).removeprefix("torch.")}"}}'
             for k, v in model.state_dict().items()]
    (HERE / name).write_text(
        "{\n" f'"source": "{source}",\n'
        f'"torch": "{torch.__version__}", "version": "{version}",\n'
        '"keys": {\n' + ",\n".join(lines) + "\n}}\n")


def _timm_logits(model, size: int, name: str, **extra) -> None:
    """Load seeded weights into ``model``; save its logits of the reference inputs."""
    state = model.state_dict()
    weights = vit_weights.seeded_state_dict({k: tuple(v.shape) for k, v in state.items()},
                                            WEIGHT_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    inputs = resnet_weights.reference_inputs(INPUT_SEED, COUNT, size)  # (N, 3, H, W)
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).numpy()
    np.savez_compressed(HERE / name, logits=logits.astype(np.float32), weight_seed=WEIGHT_SEED,
                        input_seed=INPUT_SEED, count=COUNT, size=size, **extra)


if __name__ == "__main__":
    main()
