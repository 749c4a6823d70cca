"""CLIP image embeddings (pipeline.models.clip, on pipeline.models.vit): the loader against
transformers' real CLIP state-dict layout and config.json, the JAX forward pass against
transformers' own embeddings (committed in tests/reference/, no torch needed here), a snapshot
directory exactly as transformers' ``save_pretrained`` writes it, the errors, and one run."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from reference import resnet_weights, vit_weights  # numpy only; shared with the reference

import pipeline
from pipeline.decode import decode_image
from pipeline.model import ModelError, keeps_float32
from pipeline.models import clip, safetensors, vit

REFERENCE = Path(__file__).parent / "reference"
TRANSFORMERS = json.loads((REFERENCE / "clip_state_dict.json").read_text())
KEYS = TRANSFORMERS["keys"]  # CLIPModel(CLIPConfig()): OpenAI's ViT-B/32, both towers
VISION_KEYS = [k for k in KEYS if k.startswith(clip.VISION) or k == clip.PROJECTION]
TINY = REFERENCE / "clip_tiny"  # CLIPVisionModelWithProjection.save_pretrained's own files


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A ViT-B/32 snapshot directory as users download it: transformers' config.json for
    CLIPConfig() and a model.safetensors with seeded vision weights, the projection, and (to
    show they are left unread) a few of the text tower's tensors."""
    folder = tmp_path_factory.mktemp("clip-vit-base-patch32")
    (folder / "config.json").write_text(json.dumps(TRANSFORMERS["config"]))
    state = vit_weights.seeded_state_dict({k: tuple(KEYS[k]["shape"]) for k in VISION_KEYS})
    state["logit_scale"] = np.array(2.6592, np.float32)
    state["text_projection.weight"] = np.zeros(KEYS["text_projection.weight"]["shape"], np.float32)
    state["text_model.final_layer_norm.weight"] = np.full((512,), np.nan, np.float32)
    safetensors.write(folder / "model.safetensors", state, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def model(snapshot) -> pipeline.Model:
    return clip.build(str(snapshot))


def test_vision_keys_are_transformers_key_for_key(model):
    """Our key list is transformers' vision tower and projection, in its order and shapes;
    the architecture read from the weights and config.json is OpenAI's ViT-B/32."""
    arch = model.apply.keywords["arch"]
    assert arch == vit.Arch(patch=32, dim=768, layers=12, heads=12, mlp=3072, image=224,
                            activation="quick_gelu", eps=1e-5, pre_norm=True, unit_output=True)
    ours = clip.state_dict_shapes(arch, projection=512)
    assert list(ours) == VISION_KEYS
    assert {k: list(s) for k, s in ours.items()} == {k: KEYS[k]["shape"] for k in VISION_KEYS}
    assert {KEYS[k]["dtype"] for k in VISION_KEYS} == {"float32"}
    assert model.name == "clip-vit-b-32" and model.spec.embedding_dim == 512
    assert (model.spec.height, model.spec.width, model.spec.channels) == (224, 224, 3)
    assert (model.spec.resize, model.spec.crop_fraction, model.spec.interpolation) == (
        "center_crop", 1.0, "bicubic")
    assert model.spec.mean == clip.CLIP_MEAN and model.spec.std == clip.CLIP_STD


def _embed(model: pipeline.Model, size: int) -> np.ndarray:
    x = resnet_weights.reference_inputs(1, 4, size).transpose(0, 2, 3, 1)  # NHWC, normalised
    # On A100/H100, XLA runs float32 matmuls in TF32 (~1e-3 relative) unless told otherwise.
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)(model.params, x))  # (4, P)


def test_matches_transformers_embeddings(model):
    """Same seeded weights and inputs as CLIPVisionModelWithProjection's run in
    make_clip_reference.py, normalised.

    Tolerance: measured max |diff| 1.5e-7 on unit vectors (2-core x86 CPU). We allow 1e-5:
    ~65x headroom for other CPUs and XLA versions, while real mistakes move them 170x to 6000x
    further (measured: gelu instead of quick_gelu, 0.0017; 8 heads instead of 12, 0.041; no
    LayerNorm before the blocks, 0.060). The four images' embeddings are 0.74-0.89 apart in
    cosine, so each row is its own."""
    expected = np.load(REFERENCE / "clip_b32_reference.npz")["embeds"]  # (4, 512)
    got = _embed(model, 224)
    assert np.abs(got - expected).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_a_snapshot_as_transformers_saves_it():
    """LAION-style: gelu, 16-wide heads, another size, from transformers' own config.json and
    model.safetensors (save_pretrained), by directory and by file."""
    expected = np.load(REFERENCE / "clip_tiny_reference.npz")["embeds"]  # (4, 24)
    for path in (TINY, TINY / "model.safetensors"):
        model = clip.build(str(path))
        assert model.apply.keywords["arch"] == vit.Arch(
            patch=16, dim=32, layers=2, heads=2, mlp=64, image=64, activation="gelu", eps=1e-6,
            pre_norm=True, unit_output=True)
        assert np.abs(_embed(model, 64) - expected).max() <= 1e-5


def test_the_hub_cache_folder_finds_its_snapshot(tmp_path):
    """``huggingface-cli download`` without --local-dir: models--org--name/ holds refs/main
    (the commit) and snapshots/COMMIT/ with the files."""
    repo = tmp_path / "models--laion--tiny-clip"
    shutil.copytree(TINY, repo / "snapshots" / "0123abc")
    shutil.copytree(TINY, repo / "snapshots" / "old")
    with pytest.raises(ModelError, match="2 snapshots and no refs/main"):
        clip.build(str(repo))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc\n")
    shutil.rmtree(repo / "snapshots" / "old")
    assert clip.build(str(repo)).spec.embedding_dim == 24


def test_a_bare_file_uses_openais_defaults(snapshot, model, tmp_path):
    """No config.json beside the file: 64-wide heads, quick_gelu, eps 1e-5, as OpenAI's."""
    shutil.copy(snapshot / "model.safetensors", tmp_path / "clip.safetensors")
    bare = clip.build(str(tmp_path / "clip.safetensors"))
    assert bare.apply.keywords["arch"] == model.apply.keywords["arch"]


def test_preprocessor_config_sets_mean_and_std(tmp_path):
    folder = shutil.copytree(TINY, tmp_path / "tiny")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "crop_size": 64}))
    spec = clip.build(str(folder)).spec
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.5, 1.0)


def test_bfloat16_keeps_layer_norms_float32(model):
    params = model.compute_params("bfloat16")
    kept = {jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if leaf.dtype == np.float32}
    assert kept == {"['blocks']['norm1']['bias']", "['blocks']['norm1']['scale']",
                    "['blocks']['norm2']['bias']", "['blocks']['norm2']['scale']",
                    "['norm']['bias']", "['norm']['scale']",
                    "['pre_norm']['bias']", "['pre_norm']['scale']"}
    assert all(keeps_float32(k) for k in kept)
    x = resnet_weights.reference_inputs(1, 4, 224).transpose(0, 2, 3, 1)
    low = np.asarray(jax.jit(model.apply)(params, x.astype(jax.numpy.bfloat16)), np.float32)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    cosine = (low * _embed(model, 224)).sum(axis=1) / np.linalg.norm(low, axis=1)
    assert cosine.min() > 0.99


def test_every_mismatch_in_one_error(snapshot, tmp_path):
    state = safetensors.read(snapshot / "model.safetensors",
                             keep=lambda k: k in VISION_KEYS)
    broken = dict(state)
    layer = "vision_model.encoder.layers."
    del broken[f"{layer}3.self_attn.k_proj.bias"], broken["vision_model.post_layernorm.bias"]
    broken[f"{layer}0.mlp.fc2.weight"] = state[f"{layer}0.mlp.fc2.weight"][:, :100].copy()
    broken[f"{layer}5.layer_norm1.weight"] = np.full((768,), np.inf, np.float32)
    broken["vision_model.encoder.extra.weight"] = np.zeros((2,), np.float32)
    path = safetensors.write(tmp_path / "broken.safetensors", broken)
    with pytest.raises(ModelError) as info:
        clip.build(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for part in (f"2 missing: '{layer}3.self_attn.k_proj.bias', 'vision_model.post_layernorm.bias'",
                 "1 unexpected: 'vision_model.encoder.extra.weight'",
                 f"'{layer}0.mlp.fc2.weight' (768, 100) (expected (768, 3072))",
                 f"1 non-finite: '{layer}5.layer_norm1.weight'"):
        assert part in message

    del broken["visual_projection.weight"]
    path = safetensors.write(tmp_path / "no-projection.safetensors", broken)
    with pytest.raises(ModelError, match="CLIPVisionModel without projection"):
        clip.build(str(path))


@pytest.mark.parametrize("case, why", [
    ("config", ("its config.json disagree: hidden_size 64 (the weights: 32); "
                "num_attention_heads 5 does not divide hidden_size 32")),
    ("activation", "hidden_act 'relu' (supported: quick_gelu, gelu)"),
    ("resnet", "holds no CLIP vision tower"),
    ("pickle", "holds no model.safetensors (pytorch_model.bin is a pickle, which is not read)"),
    ("absent", "No CLIP weights at"),
])
def test_wrong_files_say_why(case, why, tmp_path):
    folder = shutil.copytree(TINY, tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    if case == "config":
        config.update(hidden_size=64, num_attention_heads=5)
    if case == "activation":
        config["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    if case == "resnet":
        safetensors.write(folder / "model.safetensors", {"fc.weight": np.zeros((2, 2), np.float32)})
    if case == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    if case == "absent":
        folder = folder / "nothing-here"
    with pytest.raises(ModelError, match=re.escape(why)) as info:
        clip.build(str(folder))
    assert "\n" not in str(info.value)


def test_without_weights_says_how_to_download():
    with pytest.raises(ModelError, match="huggingface-cli download openai/clip-vit-base-patch32"):
        pipeline.load_model(None, "pipeline.models.clip:build")


def test_through_the_pipeline(ray_local, tmp_path):
    """Photos of assorted sizes and formats -> rows whose unit-length embeddings equal the
    model's on the same decoded images; a broken file is an error row with a null embedding."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i, (w, h) in enumerate([(320, 240), (240, 320), (64, 64), (500, 375), (33, 97)]):
        pixels = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC)
        img.save(photos / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    summary = pipeline.run(str(photos), str(out), model_fn="pipeline.models.clip:build",
                           model=str(TINY), batch_size=4)
    assert summary.rows_ok == 5 and summary.rows_error == 1
    rows = {Path(r["path"]).name: r for r in pq.read_table(out).to_pylist()}
    assert rows["broken.jpg"]["embedding"] is None and rows["broken.jpg"]["error_kind"] == "corrupt"
    model = clip.build(str(TINY))
    names = sorted(n for n in rows if n.startswith("photo"))
    images = np.stack([decode_image((photos / n).read_bytes(), model.spec) for n in names])
    direct = model.predict(images, batch_size=4)  # (5, 24)
    got = np.array([rows[n]["embedding"] for n in names])
    np.testing.assert_allclose(got, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert len({r["model"] for r in rows.values()}) == 1


def test_the_encoder_is_one_scanned_block():
    """The blocks run under lax.scan: the program holds one block's ops whatever the depth,
    so compile time does not grow with it."""
    arch = vit.Arch(patch=16, dim=32, layers=2, heads=2, mlp=64, image=64)
    deep = dataclasses.replace(arch, layers=12)

    def program(a: vit.Arch) -> str:
        shapes = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in vit.block_shapes(a).items()}
        params = {"patch": {"w": jax.ShapeDtypeStruct((16, 16, 3, 32), np.float32)},
                  "cls": jax.ShapeDtypeStruct((32,), np.float32),
                  "pos": jax.ShapeDtypeStruct((17, 32), np.float32),
                  "blocks": {}, "norm": {}, "head": {"w": jax.ShapeDtypeStruct((32, 8),
                                                                               np.float32)}}
        for name, s in shapes.items():
            layer, leaf = name.split(".")
            params["blocks"].setdefault(layer, {})[leaf] = s
        params["norm"] = {"scale": params["cls"], "bias": params["cls"]}
        x = jax.ShapeDtypeStruct((4, 64, 64, 3), np.float32)
        return str(jax.make_jaxpr(functools.partial(vit.apply, arch=a))(params, x))

    shallow_text, deep_text = program(arch), program(deep)
    assert "scan" in deep_text and "length=12" in deep_text
    assert abs(len(deep_text) - len(shallow_text)) < 50
