"""torchvision's ViTs (pipeline.models.vit): the loader against torchvision's real vit_b_16
state-dict layout, the JAX forward pass against torchvision's own logits (committed in
tests/reference/, no torch needed here), each factory's preprocessing, and the errors. The
encoder runs through the pipeline in tests/test_clip.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from reference import resnet_weights, vit_weights  # numpy only; shared with the reference

import pipeline
from pipeline.model import ModelError
from pipeline.models import safetensors, vit

REFERENCE = Path(__file__).parent / "reference"
TORCH_KEYS = json.loads((REFERENCE / "vit_b_16_state_dict.json").read_text())["keys"]


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """Seeded values for every key of torchvision's vit_b_16 state dict."""
    return vit_weights.seeded_state_dict({k: tuple(v["shape"]) for k, v in TORCH_KEYS.items()})


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory) -> Path:
    """``state`` as the .safetensors file the README's export command writes."""
    return safetensors.write(tmp_path_factory.mktemp("vit") / "vit_b_16.safetensors", state)


@pytest.fixture(scope="module")
def model(weights) -> pipeline.Model:
    return vit.build(str(weights))


def test_architecture_is_torchvisions_key_for_key(model):
    arch = model.apply.keywords["arch"]
    assert arch == vit.Arch(patch=16, dim=768, layers=12, heads=12, mlp=3072, image=224,
                            activation="gelu", eps=1e-6)
    ours = vit.torchvision_shapes(arch)
    assert list(ours) == list(TORCH_KEYS)
    assert {k: list(s) for k, s in ours.items()} == {k: v["shape"] for k, v in TORCH_KEYS.items()}
    assert model.name == "vit_b_16" and len(model.spec.class_names) == 1000


def test_matches_torchvision_logits(model):
    """Same seeded weights and inputs as torchvision's run in make_vit_reference.py.

    Tolerance: measured max |diff| 3.3e-6 with logits up to 3.8 (2-core x86 CPU). We allow
    1e-4 of the largest logit (3.8e-4): ~115x headroom, while real mistakes move logits 120x
    and more further (measured: quick_gelu for gelu, 0.046; 16 heads for 12, 1.26). LayerNorm's
    epsilon (1e-6 here, 1e-5 elsewhere) moves them by 1.5e-5 only at these weights, so the
    test of it is the architecture above."""
    ref = np.load(REFERENCE / "vit_b_16_reference.npz")
    x = resnet_weights.reference_inputs(int(ref["input_seed"]), int(ref["count"]), 224)
    expected = ref["logits"]  # (4, 1000)
    with jax.default_matmul_precision("highest"):  # no TF32 on A100/H100
        logits = np.asarray(jax.jit(model.apply)(model.params, x.transpose(0, 2, 3, 1)))
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5],
                                  np.argsort(-expected, axis=1)[:, :5])


def test_each_factory_has_torchvisions_transform(model, weights, tmp_path):
    """IMAGENET1K_V1: 256 -> 224 bilinear (vit_l_16: 242 -> 224); SWAG: the input size,
    bicubic, no margin."""
    assert (model.spec.height, model.spec.resize, model.spec.interpolation) == (
        224, "center_crop", "bilinear")
    assert model.spec.crop_fraction == 224 / 256
    assert model.spec.mean == (0.485, 0.456, 0.406) and model.spec.std == (0.229, 0.224, 0.225)
    swag = vit.build_swag(str(weights)).spec
    assert (swag.crop_fraction, swag.interpolation) == (1.0, "bicubic")
    # A one-layer vit_l_16 shape (width 1024, 16x16 patches, 224 input, a narrow MLP): the
    # factory tells it from the weights' shapes.
    arch = vit.Arch(patch=16, dim=1024, layers=1, heads=16, mlp=8, image=224)
    large = vit_weights.seeded_state_dict(vit.torchvision_shapes(arch))
    spec = vit.build(str(safetensors.write(tmp_path / "vit_l_16.safetensors", large))).spec
    assert spec.crop_fraction == 224 / 242


def test_every_mismatch_in_one_error(state, tmp_path):
    broken = dict(state)
    layer = "encoder.layers.encoder_layer_"
    del broken[f"{layer}4.ln_2.bias"]
    broken[f"{layer}12.ln_1.weight"] = np.ones((768,), np.float32)  # a 13th layer, partly
    broken["heads.head.weight"] = np.zeros((10, 768), np.float32)  # a 10-class fine-tune
    broken[f"{layer}0.self_attention.in_proj_weight"] = np.full((2304, 768), np.nan, np.float32)
    path = safetensors.write(tmp_path / "broken.safetensors", broken)
    with pytest.raises(ModelError) as info:
        vit.build(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    # The partial 13th layer counts as a 13th layer, whose other 11 tensors are missing.
    for part in (f"12 missing: '{layer}4.ln_2.bias', '{layer}12.ln_1.bias', ",
                 "'heads.head.weight' (10, 768) (expected (1000, 768))",
                 f"1 non-finite: '{layer}0.self_attention.in_proj_weight'"):
        assert part in message


@pytest.mark.parametrize("case, why", [
    ("absent", "No ViT weights at"),
    ("resnet", "it has no 'conv_proj.weight'"),
    ("width", "width 512 and 197 position embeddings are none of vit_b_16"),
])
def test_wrong_files_say_why(case, why, state, tmp_path):
    path = tmp_path / "weights.safetensors"
    if case == "resnet":
        safetensors.write(path, {"fc.weight": np.zeros((1000, 2048), np.float32)})
    if case == "width":
        safetensors.write(path, {"conv_proj.weight": np.zeros((512, 3, 16, 16), np.float32),
                                 "encoder.pos_embedding": np.zeros((1, 197, 512), np.float32),
                                 "encoder.layers.encoder_layer_0.mlp.0.weight":
                                     np.zeros((2048, 512), np.float32)})
    with pytest.raises(ModelError, match=re.escape(why)) as info:
        vit.build(str(path))
    assert "\n" not in str(info.value)


def test_without_weights_says_how_to_export():
    with pytest.raises(ModelError, match=re.escape("torchvision.models.vit_b_16(weights=")):
        pipeline.load_model(None, "pipeline.models.vit:build")


def test_flop_estimate_counts_every_block(model):
    """The plan sizes a GPU's device batch from check_model's FLOPs per image. XLA counts a
    scan's body once (12x too few here); pipeline.flops multiplies it out. ViT-B/16 by hand:
    per block 4 D^2 + 2 D M multiply-adds per token and 2 T^2 D for attention; the patch conv
    196 x D x (3 x 16 x 16); the head D x 1000."""
    from pipeline.model import check_model

    t, d, m = 197, 768, 3072
    macs = 12 * (t * (4 * d * d + 2 * d * m) + 2 * t * t * d) + 196 * d * 768 + d * 1000
    flops = check_model(model, batch_size=32)
    assert flops == pytest.approx(2 * macs, rel=0.01)  # 35.1 GFLOPs


# --- timm's ViTs ------------------------------------------------------------------------------

TIMM_SMALL = np.load(REFERENCE / "timm_vit_small_reference.npz")
TIMM_KEYS = json.loads((REFERENCE / "timm_vit_small_state_dict.json").read_text())["keys"]
TIMM_TINY = REFERENCE / "timm_tiny"  # timm's save_for_hf files: avg pool, layer scale, norm_pre


def _timm_logits(model: pipeline.Model, size: int) -> np.ndarray:
    x = resnet_weights.reference_inputs(1, 4, size).transpose(0, 2, 3, 1)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)(model.params, x))


def test_timm_vit_small_matches_timm(tmp_path):
    """vit_small_patch16_224 (6 heads) as a snapshot folder: timm's keys in its order, its
    config.json's preprocessing, and logits equal to timm's on the same seeded weights
    (measured max |diff| 3.8e-6 with logits up to 4.1; tolerance as for vit_b_16)."""
    from pipeline.models import timm_vit

    state = vit_weights.seeded_state_dict({k: tuple(v["shape"]) for k, v in TIMM_KEYS.items()})
    safetensors.write(tmp_path / "model.safetensors", state)
    (tmp_path / "config.json").write_text(str(TIMM_SMALL["config"]))  # save_for_hf's
    model = timm_vit.build(str(tmp_path))
    arch = model.apply.keywords["arch"]
    assert (arch.dim, arch.heads, arch.layers, arch.pool, arch.pre_norm) == (384, 6, 12, "token",
                                                                           False)
    assert list(timm_vit.state_dict_shapes(arch, state)) == list(TIMM_KEYS)
    assert model.name == "vit_small_patch16_224" and model.spec.class_names[0] == "tench"
    assert (model.spec.crop_fraction, model.spec.interpolation) == (0.9, "bicubic")
    assert model.spec.mean == (0.5, 0.5, 0.5) and model.spec.std == (0.5, 0.5, 0.5)
    expected = TIMM_SMALL["logits"]
    assert np.abs(_timm_logits(model, 224) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_timm_variants_average_pool_layer_scale_and_no_head(tmp_path):
    """A ViT as timm's save_for_hf writes it: average pooling (fc_norm), layer scale, a
    LayerNorm before the blocks, no patch bias, 2 heads from model_args, 10 classes named by
    number; the same without its head is an embedding model; register tokens are refused."""
    from pipeline.models import timm_vit

    model = timm_vit.build(str(TIMM_TINY))
    assert model.apply.keywords["arch"] == vit.Arch(
        patch=16, dim=32, layers=2, heads=2, mlp=64, image=64, eps=1e-6, pre_norm=True,
        pool="avg")
    assert model.spec.class_names == tuple(map(str, range(10)))
    expected = np.load(REFERENCE / "timm_tiny_reference.npz")["logits"]
    assert np.abs(_timm_logits(model, 64) - expected).max() <= 1e-4 * np.abs(expected).max()

    state = safetensors.read(TIMM_TINY / "model.safetensors")
    headless = {k: v for k, v in state.items() if not k.startswith("head.")}
    features = timm_vit.build(str(safetensors.write(tmp_path / "features.safetensors", headless)))
    assert features.spec.output == "embedding" and features.spec.embedding_dim == 32
    # No config.json beside it: the defaults of timm's vit_* weights, and 64-wide heads.
    assert (features.spec.crop_fraction, features.spec.mean) == (0.9, (0.5, 0.5, 0.5))
    assert features.apply.keywords["arch"].heads == 1

    registers = {**state, "reg_token": np.zeros((1, 4, 32), np.float32)}
    with pytest.raises(ModelError, match="1 unexpected: 'reg_token'"):
        timm_vit.build(str(safetensors.write(tmp_path / "reg.safetensors", registers)))
    with pytest.raises(ModelError, match="huggingface-cli download timm/vit_base_patch16_224"):
        pipeline.load_model(None, "pipeline.models.timm_vit:build")
