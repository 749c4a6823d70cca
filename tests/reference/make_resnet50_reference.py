"""Write the torchvision reference that ``tests/test_resnet.py`` compares our JAX ResNet-50 with,
so CI checks against torchvision itself without installing torch.

Run it (from the repository root) with torch, torchvision and safetensors in a separate
environment; never add torch to the project's dependencies::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch torchvision safetensors numpy
    /tmp/venv-torch/bin/python tests/reference/make_resnet50_reference.py

It writes, beside itself (about 40 KB in all; no weights):

- ``resnet50_state_dict.json``: every key, shape and dtype of torchvision's real
  ``resnet50().state_dict()`` (``num_batches_tracked`` included), and the versions used;
- ``resnet50_reference.npz``: the logits of ``torchvision.models.resnet50()`` in eval mode,
  loaded with ``resnet_weights.seeded_state_dict`` (seed ``WEIGHT_SEED``), for
  ``resnet_weights.reference_inputs(INPUT_SEED, COUNT, SIZE)``, plus a checksum of those
  inputs so a change in numpy's random streams shows up as such and not as a model mismatch;
- ``official_writer.safetensors``: a few small tensors (F32, F16, BF16, I64, a scalar) written by
  the ``safetensors`` package itself, to check our reader against the reference writer.

Last run: torch 2.14.1, torchvision 0.29.1, safetensors 0.8.0, numpy 2.4.6, CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import resnet_weights  # beside this script, which Python puts first on sys.path
import torch
import torchvision
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent

WEIGHT_SEED = 0
INPUT_SEED = 1
COUNT = 4
SIZE = 224


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    state = model.state_dict()
    # One key per line, in state-dict order, so a diff after a torchvision upgrade reads well.
    lines = [
        f'  {json.dumps(k)}: {{"shape": {json.dumps(list(v.shape))}, '
        f'"dtype": "{str(v.dtype).removeprefix("torch.")}"}}'
        for k, v in state.items()
    ]
    (HERE / "resnet50_state_dict.json").write_text(
        "{\n"
        '"source": "torchvision.models.resnet50().state_dict()",\n'
        f'"torch": "{torch.__version__}", "torchvision": "{torchvision.__version__}",\n'
        '"keys": {\n' + ",\n".join(lines) + "\n}}\n"
    )

    weights = resnet_weights.seeded_state_dict(
        {k: tuple(v.shape) for k, v in state.items()}, WEIGHT_SEED
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    inputs = resnet_weights.reference_inputs(INPUT_SEED, COUNT, SIZE)  # (N, 3, H, W)
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).numpy()  # (N, 1000)
    np.savez_compressed(
        HERE / "resnet50_reference.npz",
        logits=logits.astype(np.float32),
        weight_seed=WEIGHT_SEED, input_seed=INPUT_SEED, count=COUNT, size=SIZE,
        input_sum=np.float64(inputs.astype(np.float64).sum()),
        input_head=inputs.reshape(-1)[:16],
    )

    save_file({
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
        "f16": torch.tensor([0.5, -1.25, 65504.0], dtype=torch.float16),
        "bf16": torch.tensor([[1.0, -2.5], [3.0e38, 1.0e-3]], dtype=torch.bfloat16),
        "i64": torch.tensor([7, -1], dtype=torch.int64),
        "scalar": torch.tensor(12345, dtype=torch.int64),
    }, str(HERE / "official_writer.safetensors"), metadata={"format": "pt"})

    top5 = np.argsort(-logits, axis=1)[:, :5]
    print(f"logits {logits.shape}, std {logits.std():.3f}, top-5 per image:\n{top5}")


if __name__ == "__main__":
    main()
