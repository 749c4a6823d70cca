"""Write the transformers reference that ``tests/test_clip.py`` compares our JAX CLIP vision
tower with, so CI checks against transformers itself without installing torch.

Run it (from the repository root) with torch and transformers in a separate environment;
never add them to the project's dependencies::

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch transformers safetensors numpy
    /tmp/venv-torch/bin/python tests/reference/make_clip_reference.py

It writes, beside itself (about 250 KB in all):

- ``clip_state_dict.json``: every key, shape and dtype of ``CLIPModel(CLIPConfig())`` (the
  default config is OpenAI's ViT-B/32, the layout of ``openai/clip-vit-base-patch32``'s
  ``model.safetensors``), text tower included, and the ``config.json`` that
  ``save_pretrained`` writes for it;
- ``clip_b32_reference.npz``: ``CLIPVisionModelWithProjection``'s ``image_embeds``,
  L2-normalised, with the vision keys loaded from ``vit_weights.seeded_state_dict`` (seed
  ``WEIGHT_SEED``), for ``resnet_weights.reference_inputs(INPUT_SEED, COUNT, 224)``;
- ``clip_tiny/``: a small CLIP vision tower (``gelu`` as LAION's models use, 16-wide heads,
  64x64 input, 16x16 patches, 2 layers) as ``save_pretrained`` writes it (``config.json`` and
  ``model.safetensors``), seeded likewise, and its normalised embeddings of 64x64 reference
  inputs in ``clip_tiny_reference.npz``.

Last run: see the versions in ``clip_state_dict.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import resnet_weights
import torch
import transformers
import vit_weights  # beside this script, which Python puts first on sys.path
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

HERE = Path(__file__).resolve().parent

WEIGHT_SEED = 0
INPUT_SEED = 1
COUNT = 4
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 64, "patch_size": 16, "projection_dim": 24,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6}


def main() -> None:
    torch.manual_seed(0)
    config = CLIPConfig()
    full = CLIPModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        saved_config = json.loads((Path(tmp) / "config.json").read_text())
    lines = [
        f'  {json.dumps(k)}: {{"shape": {json.dumps(list(v.shape))}, '
        f'"dtype": "{str(v.dtype).removeprefix("torch.")}"}}'
        for k, v in full.state_dict().items()
    ]
    (HERE / "clip_state_dict.json").write_text(
        "{\n"
        '"source": "transformers.CLIPModel(CLIPConfig()).state_dict()",\n'
        f'"torch": "{torch.__version__}", "transformers": "{transformers.__version__}",\n'
        f'"config": {json.dumps(saved_config, sort_keys=True)},\n'
        '"keys": {\n' + ",\n".join(lines) + "\n}}\n"
    )
    embeds = _embeddings(CLIPVisionModelWithProjection(config.vision_config).eval(), 224)
    np.savez_compressed(HERE / "clip_b32_reference.npz", embeds=embeds, weight_seed=WEIGHT_SEED,
                        input_seed=INPUT_SEED, count=COUNT, size=224)

    tiny = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()
    embeds = _embeddings(tiny, TINY["image_size"])
    tiny.save_pretrained(HERE / "clip_tiny")  # config.json + model.safetensors, float32
    np.savez_compressed(HERE / "clip_tiny_reference.npz", embeds=embeds, weight_seed=WEIGHT_SEED,
                        input_seed=INPUT_SEED, count=COUNT, size=TINY["image_size"])


def _embeddings(model, size: int) -> np.ndarray:
    """Load seeded weights into ``model``; its normalised image embeddings of the reference
    inputs, (COUNT, projection) float32."""
    state = model.state_dict()
    weights = vit_weights.seeded_state_dict({k: tuple(v.shape) for k, v in state.items()},
                                             WEIGHT_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    inputs = resnet_weights.reference_inputs(INPUT_SEED, COUNT, size)  # (N, 3, H, W)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(inputs)).image_embeds
    out = out / out.norm(dim=-1, keepdim=True)
    return out.numpy().astype(np.float32)


if __name__ == "__main__":
    main()
