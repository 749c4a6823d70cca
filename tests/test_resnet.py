"""ResNet-50 (pipeline.models.resnet): the loader against torchvision's real state-dict layout,
the JAX forward pass against torchvision's own logits (committed in tests/reference/, no torch
needed here), BatchNorm folding, the safetensors reader's failures, and one pipeline run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from reference import resnet_weights  # numpy only; shared with make_resnet50_reference.py

import pipeline
from pipeline.decode import decode_image
from pipeline.model import ModelError
from pipeline.models import resnet, safetensors

REFERENCE = Path(__file__).parent / "reference"

TORCH_KEYS = json.loads((REFERENCE / "resnet50_state_dict.json").read_text())["keys"]


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """Seeded values for every key of torchvision's resnet50 state dict, in its dtypes."""
    shapes = {k: tuple(v["shape"]) for k, v in TORCH_KEYS.items()}
    weights = resnet_weights.seeded_state_dict(shapes, seed=0)
    return {k: v.astype(TORCH_KEYS[k]["dtype"]) for k, v in weights.items()}


@pytest.fixture(scope="module")
def weights(state, tmp_path_factory) -> Path:
    """``state`` as the .safetensors file the README's export command writes."""
    return safetensors.write(tmp_path_factory.mktemp("resnet") / "resnet50.safetensors", state)


@pytest.fixture(scope="module")
def model(weights) -> pipeline.Model:
    return resnet.build(str(weights))


def test_architecture_is_torchvisions_key_for_key():
    """Our key list is torchvision's, in its order, with the same shapes and dtypes."""
    ours = resnet.state_dict_shapes()
    assert list(ours) == list(TORCH_KEYS)
    assert {k: list(s) for k, s in ours.items()} == {k: v["shape"] for k, v in TORCH_KEYS.items()}
    assert {v["dtype"] for k, v in TORCH_KEYS.items() if k.endswith("num_batches_tracked")} == {
        "int64"}


def test_matches_torchvision_logits(model):
    """Same seeded weights and inputs as torchvision's run in make_resnet50_reference.py.

    Tolerance: float32 everywhere, but XLA and torch (oneDNN) pick different conv algorithms and
    summation orders, and we fold BN into the convs; the rounding differences compound over 53
    convs. Measured on a 2-core x86 CPU: max |diff| 9.5e-6 with logits up to 14.7 (6.5e-7
    relative). We allow 1e-4 of the largest logit (1.5e-3): ~150x headroom for other CPUs and
    XLA versions, while real mistakes move logits 50x to 600x further (measured: BN eps 1e-3
    instead of 1e-5, 0.075; the stem kernel's H and W swapped, 0.57; "SAME" padding, 0.86).
    """
    ref = np.load(REFERENCE / "resnet50_reference.npz")
    x = resnet_weights.reference_inputs(int(ref["input_seed"]), int(ref["count"]), int(ref["size"]))
    # If numpy's random streams ever change, say so rather than report a model mismatch.
    assert np.allclose(x.reshape(-1)[:16], ref["input_head"]), "reference inputs changed: re-run"
    expected = ref["logits"]  # (4, 1000)
    # On A100/H100, XLA runs float32 convs in TF32 (~1e-3 relative) unless told otherwise.
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(jax.jit(resnet.apply)(model.params, x.transpose(0, 2, 3, 1)))  # NHWC
    scale = np.abs(expected).max()
    assert np.abs(logits - expected).max() <= 1e-4 * scale
    top5 = np.argsort(-logits, axis=1)[:, :5]
    np.testing.assert_array_equal(top5, np.argsort(-expected, axis=1)[:, :5])


def test_bn_folding_is_exact():
    """conv(x, w') + b' == BN(conv(x, w)) on a small strided case, against a float64 numpy conv
    with torch's layout and padding, including extreme BN statistics."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 6, 3))  # (B, H, W, C), odd and even sizes
    w = rng.standard_normal((5, 3, 3, 3))  # (O, I, kh, kw), torch layout
    gamma = np.array([1.0, -2.0, 0.3, 5.0, 1e-3])
    beta, mean = rng.standard_normal(5), rng.standard_normal(5) * 3
    var = np.array([1.0, 1e-6, 0.25, 4.0, 100.0])  # 1e-6: eps dominates
    conv = _numpy_conv(x, w, stride=2, pad=1)  # (B, 4, 3, 5)
    unfolded = (conv - mean) / np.sqrt(var + 1e-5) * gamma + beta
    folded = resnet.fold_conv_bn(w, gamma, beta, mean, var)
    assert folded["w"].shape == (3, 3, 3, 5) and folded["w"].dtype == np.float32
    got = np.asarray(resnet._conv(x.astype(np.float32), folded, stride=2))
    np.testing.assert_allclose(got, unfolded, rtol=1e-5, atol=1e-5 * np.abs(unfolded).max())


def test_every_mismatch_in_one_error(state, tmp_path):
    broken = dict(state)
    del broken["layer2.1.bn2.running_var"], broken["fc.bias"]
    broken["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    broken["fc.weight"] = np.zeros((10, 2048), np.float32)  # a 10-class fine-tune
    broken["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :, :1, :1].copy()
    broken["bn1.num_batches_tracked"] = np.zeros((), np.float32)
    broken["layer3.2.conv1.weight"] = np.full_like(state["layer3.2.conv1.weight"], np.nan)
    broken["layer4.0.bn3.running_var"] = -state["layer4.0.bn3.running_var"]
    path = safetensors.write(tmp_path / "broken.safetensors", broken)
    with pytest.raises(ModelError) as info:
        resnet.build(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for part in ("2 missing: 'layer2.1.bn2.running_var', 'fc.bias'",
                 "1 unexpected: 'layer5.0.conv1.weight'",
                 "'fc.weight' (10, 2048) (expected (1000, 2048))",
                 "'layer1.0.conv2.weight' (64, 64, 1, 1) (expected (64, 64, 3, 3))",
                 "'bn1.num_batches_tracked' float32 (expected an integer)",
                 ("2 non-finite or negative-variance values: 'layer3.2.conv1.weight', "
                  "'layer4.0.bn3.running_var'")):
        assert part in message


def test_ddp_prefix_half_precision_and_no_step_counters(state, model, tmp_path):
    """bf16 and f16 checkpoints load (upcast exactly, then folded), keys may carry DDP's
    ``module.`` prefix, and num_batches_tracked (training-only) may be absent."""
    for dtype in (ml_dtypes.bfloat16, np.float16):
        half = {f"module.{k}": v.astype(dtype) for k, v in state.items()
                if not k.endswith("num_batches_tracked")}
        params = resnet.load(safetensors.write(tmp_path / "half.safetensors", half))
        exact = resnet.fold_state_dict(
            {k.removeprefix("module."): v.astype(np.float32) for k, v in half.items()})
        jax.tree.map(np.testing.assert_array_equal, params, exact)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.02, atol=0.02),
                     params, model.params)


def test_unreadable_files_say_why(weights, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-1000])
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes((20).to_bytes(8, "little") + b"{not json at all}   " + b"\0" * 64)
    overlapping = tmp_path / "overlapping.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    overlapping.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    pickle = tmp_path / "resnet50.pth"
    pickle.write_bytes(b"PK\x03\x04" + b"\0" * 200)  # torch.save's zip, not safetensors
    for path, why in ((truncated, "truncated, its header describes"),
                      (garbled, "its header is not JSON"),
                      (overlapping, "the data of 'b' overlaps the tensor before it"),
                      (pickle, "(truncated, or not a safetensors file)"),
                      (tmp_path / "absent.safetensors", "No ResNet-50 weights at")):
        with pytest.raises(ModelError, match=re.escape(why)) as info:
            resnet.build(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_reader_agrees_with_the_safetensors_package():
    """A file written by the safetensors package itself (see make_resnet50_reference.py)."""
    tensors = safetensors.read(REFERENCE / "official_writer.safetensors")
    np.testing.assert_array_equal(tensors["f32"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
    np.testing.assert_array_equal(tensors["f16"], np.array([0.5, -1.25, 65504.0], np.float16))
    assert tensors["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors["bf16"].astype(np.float32),
                                  np.array([[1.0, -2.5], [3.0e38, 1.0e-3]], ml_dtypes.bfloat16))
    np.testing.assert_array_equal(tensors["i64"], [7, -1])
    assert tensors["scalar"].shape == () and tensors["scalar"] == 12345


def test_without_weights_says_how_to_export():
    with pytest.raises(ModelError) as info:
        pipeline.load_model(None, "pipeline.models.resnet:build")
    assert "save_file(torchvision.models.resnet50(weights=" in str(info.value)
    assert "timm.create_model('resnet50'" in str(info.value)


def test_through_the_pipeline(ray_local, model, weights, tmp_path):
    """Six photos of assorted sizes and formats -> six rows with ImageNet top-5 labels, equal to
    the model run directly on the same decoded images."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i, (w, h) in enumerate([(320, 240), (240, 320), (224, 224), (500, 375), (96, 128),
                                (640, 480)]):
        pixels = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC)
        img.save(photos / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    out = tmp_path / "out"
    summary = pipeline.run(str(photos), str(out), model_fn="pipeline.models.resnet:build",
                           model=str(weights), batch_size=4)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and summary.rows_ok == 6
    classes = resnet.imagenet_classes()
    assert classes[0] == "tench" and classes[-1] == "toilet tissue"
    images = np.stack([decode_image(Path(r["path"]).read_bytes(), model.spec) for r in rows])
    probs = model.predict(images, batch_size=4)  # (6, 1000)
    for row, p in zip(rows, probs):
        assert row["status"] == "ok" and len(row["topk_labels"]) == 5
        assert row["label_name"] == classes[row["label"]]
        assert row["topk_labels"] == list(np.argsort(-p)[:5])
        np.testing.assert_allclose(row["topk_scores"], np.sort(p)[::-1][:5], rtol=1e-4)


def _numpy_conv(x, w, stride: int, pad: int) -> np.ndarray:
    """(B, H, W, I) x (O, I, kh, kw) -> (B, H', W', O), float64, torch's zero padding."""
    kh, kw = w.shape[2:]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = (x.shape[1] - kh) // stride + 1
    cols = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], rows, cols, w.shape[0]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * rows : stride, j : j + stride * cols : stride]
            out += patch @ w[:, :, i, j].T  # (B, H', W', I) @ (I, O)
    return out
