"""Write the torchvision reference that ``tests/test_vit.py`` compares our JAX ViT with, so CI
checks against torchvision itself without installing torch.

Run it (from the repository root) with torch and torchvision in a separate environment; never
add them to the project's dependencies::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch torchvision numpy
    /tmp/venv-torch/bin/python tests/reference/make_vit_reference.py

It writes, beside itself (about 30 KB; no weights):

- ``vit_b_16_state_dict.json``: every key, shape and dtype of torchvision's
  ``vit_b_16().state_dict()``, and the versions used;
- ``vit_b_16_reference.npz``: the logits of ``torchvision.models.vit_b_16()`` in eval mode,
  loaded with ``vit_weights.seeded_state_dict`` (seed ``WEIGHT_SEED``), for
  ``resnet_weights.reference_inputs(INPUT_SEED, COUNT, 224)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import resnet_weights  # beside this script, which Python puts first on sys.path
import torch
import torchvision
import vit_weights

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


if __name__ == "__main__":
    main()
