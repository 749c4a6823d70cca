"""The model contract: shapes, batching, padding, one compile, checkpoint checks, accuracy."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import COMPILES, digit_images

from pipeline import digits
from pipeline.config import RunConfig
from pipeline.decode import decode_image
from pipeline.device import Executor
from pipeline.infer import Predictor
from pipeline.model import ModelError, load_model
from pipeline.models import digits_cnn


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_param_shapes_and_count(model):
    config = digits_cnn.CNNConfig(**json.loads((digits_cnn.BUNDLED_DIR / "model.json").read_text())["architecture"])
    shapes = {k: v.shape for k, v in model.params.items()}
    assert shapes == config.param_shapes()
    c1, c2 = config.conv1_features, config.conv2_features
    expected = 9 * c1 + c1 + 9 * c1 * c2 + c2 + 8 * 8 * c2 * 10 + 10
    assert sum(v.size for v in model.params.values()) == expected
    assert model.spec.shape == (32, 32, 1)
    assert model.spec.class_names == tuple(str(i) for i in range(10))


def test_predict_shapes_and_probabilities(model):
    images, _ = digit_images(10)
    probs = model.predict(images)
    assert probs.shape == (10, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_batched_equals_one_at_a_time(model):
    images, _ = digit_images(40)
    batched = model.predict(images, batch_size=32)
    single = np.concatenate([model.predict(images[i : i + 1], batch_size=1) for i in range(40)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_padding_changes_no_real_row(model):
    images, _ = digit_images(7)
    executor = model.executor(32)
    short = executor.run(images)["scores"]  # padded with 25 zero images
    noisy = np.concatenate([images, np.random.default_rng(0).integers(0, 256, (25, 32, 32, 1), np.uint8)])
    full = executor.run(noisy)["scores"][:7]
    assert short.shape == (7, 10)
    np.testing.assert_allclose(short, full, atol=1e-6)


def test_one_compilation_per_actor_across_batch_sizes(model):
    images, _ = digit_images(71)
    before = COMPILES.count
    predictor = Predictor(model_path=None, model_fn=None, batch_size=32, top_k=3)
    after_init = COMPILES.count
    for lo, hi in [(0, 32), (32, 64), (64, 71)]:
        batch = {
            "path": np.array([f"x{i}" for i in range(lo, hi)], dtype=object),
            "image": images[lo:hi],
            "error": np.array([None] * (hi - lo), dtype=object),
            "_t_decode": np.zeros(hi - lo),
        }
        out = predictor(batch)
        assert len(out["label"]) == hi - lo
        assert out["topk_labels"].shape == (hi - lo, 3)
    assert after_init - before == 1
    predictor.executor.run(np.zeros((33, 32, 32, 1), np.uint8))  # a batch and a 1-row tail
    assert COMPILES.count == after_init, "a batch recompiled the model"


def test_heldout_accuracy_at_least_96_percent(model):
    """The last 297 digits (never trained on), rendered the sample-data ways, via predict."""
    _, (x, y) = digits.load_split()
    assert len(x) == 297
    rng = np.random.default_rng(123)
    images = []
    for i, values in enumerate(x):
        img = digits.render(values, int(rng.integers(16, 129)), ("nearest", "bilinear")[i % 2], rgb=i % 3 == 0)
        images.append(decode_image(digits.encode(img, ("PNG", "JPEG")[(i // 2) % 2]), model.spec))
    accuracy = float((model.predict(np.stack(images)).argmax(axis=1) == y).mean())
    assert accuracy >= 0.96, f"held-out accuracy {accuracy:.3f}"


def test_fingerprint_tracks_weights(model, tmp_path):
    shutil.copytree(digits_cnn.BUNDLED_DIR, tmp_path / "m", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    assert load_model(tmp_path / "m").fingerprint == model.fingerprint
    config, params, meta = digits_cnn.load(tmp_path / "m")
    params["dense/b"] = params["dense/b"] + 1.0
    digits_cnn.save(tmp_path / "changed", config, params, meta["class_names"])
    assert load_model(tmp_path / "changed").fingerprint != model.fingerprint


def test_load_lists_every_mismatch(tmp_path):
    config = digits_cnn.CNNConfig()
    params = digits_cnn.init_params(config)
    params["conv1/w"] = np.zeros((5, 5, 1, 16), np.float32)  # wrong shape
    del params["dense/b"]  # missing
    params["extra/w"] = np.zeros(3, np.float32)  # unexpected
    digits_cnn.save(tmp_path, config, params, [str(i) for i in range(10)])
    with pytest.raises(ModelError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "conv1/w" in message and "dense/b" in message and "extra/w" in message


def test_weights_are_not_pickled(tmp_path):
    config = digits_cnn.CNNConfig()
    digits_cnn.save(tmp_path, config, digits_cnn.init_params(config), list("0123456789"))
    with np.load(tmp_path / "weights.npz", allow_pickle=False) as npz:
        assert all(npz[k].dtype == np.float32 for k in npz.files)
    (tmp_path / "weights.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="Unreadable model"):
        load_model(tmp_path)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="No model at"):
        load_model(tmp_path / "nope")


def test_bfloat16_compute_keeps_float32_io_and_agrees(model):
    images, _ = digit_images(64)
    f32 = model.executor(32).run(images[:32])["scores"]
    program = model.program(compute_dtype="bfloat16")
    bf16 = Executor(program, model.compute_params("bfloat16"), model.spec.shape, 32).run(
        images[:32])["scores"]
    assert bf16.dtype == np.float32 and bf16.shape == f32.shape
    assert all(np.asarray(v).dtype == np.float32 for v in model.params.values())
    assert (bf16.argmax(1) == f32.argmax(1)).mean() >= 0.9
    np.testing.assert_allclose(bf16, f32, atol=0.1)


def test_a_local_models_version_is_its_times_on_its_machine_and_its_bytes_elsewhere(
        tmp_path, monkeypatch):
    """An actor on the driver's machine refuses weights rewritten since the driver loaded
    them (their times changed). One on another machine holds a copy with times of its own:
    it compares the bytes, so a stale copy (a fine-tuned checkpoint's previous version: same
    names, same sizes) is refused instead of writing rows under the driver's fingerprint."""
    import os

    from pipeline import model_files

    monkeypatch.setattr(model_files, "DIGESTS", tmp_path / "digests")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"weights")
    path, version = str(weights), model_files.local_version(str(weights))
    content = model_files.content_digest(path, version)
    driver = model_files.with_content(path, version)  # what the driver hands its actors
    assert driver == f"{version} {content}"
    assert version and content and model_files.resolve(path) == (path, "")
    assert model_files.resolve(path, expect=driver) == (path, version)
    model_files.check_copy(path, driver)  # the driver's own machine: times only
    assert len(list((tmp_path / "digests").iterdir())) == 1  # read once per version
    files = version.split(" ", 1)[1]
    model_files.check_copy(path, f"another-host/boot {files} {content}")
    with pytest.raises(ModelError, match="not the bytes the run's driver loaded"):
        model_files.check_copy(path, f"another-host/boot {files} {'0' * 24}")
    # Times are compared on the driver's machine only: another's copy has times of its own.
    assert model_files.resolve(path, expect=f"another-host/boot {'0' * 24} {content}")[0] == path
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ModelError, match="changed after this run started"):
        model_files.resolve(path, expect=driver)
    # Another machine's copy of the same bytes, other times: the same digest.
    copy = tmp_path / "copy" / "weights.bin"
    copy.parent.mkdir()
    copy.write_bytes(b"weights")
    assert model_files.content_digest(str(copy), model_files.local_version(str(copy))) == content
    weights.write_bytes(b"weighTs")  # same name, same size
    assert model_files.content_digest(path, model_files.local_version(path)) != content
    assert model_files.resolve(None) == (None, "")
    assert model_files.resolve(str(tmp_path / "nothing")) == (str(tmp_path / "nothing"), "")
    assert model_files.resolve(str(tmp_path / "nothing"), expect=driver)[1] == ""
    # A folder too big to read at each new version (every epoch's checkpoint) has no digest.
    monkeypatch.setattr(model_files, "DIGEST_MAX_BYTES", 6)
    big = tmp_path / "epochs" / "weights.bin"
    big.parent.mkdir()
    big.write_bytes(b"weights")
    assert model_files.content_digest(str(big), model_files.local_version(str(big))) == ""


def test_the_driver_hands_its_actors_the_bytes_of_a_local_model(tmp_path, monkeypatch):
    """Where an actor may run on another machine, the driver's version of a local model
    carries a digest of its bytes; an actor there whose copy holds other bytes (same name,
    same size) is refused after its factory ran. A run on the driver's machine alone reads
    nothing more."""
    import poison_model

    from pipeline import model_files
    from pipeline.plan import Cluster, Node
    from pipeline.runner import _actor_weights

    monkeypatch.setattr(model_files, "DIGESTS", tmp_path / "digests")
    options = poison_model.write_options(tmp_path / "model.json", delay=0.1)
    model = load_model(options, "poison_model:build")
    assert model.weights == model_files.local_version(options)
    cfg = RunConfig(input="in", output="out", model=options, model_fn="poison_model:build")
    alone = Cluster((Node("n1", "127.0.0.1", 2, 0, 1e9, True),))
    monkeypatch.setattr("pipeline.runner.this_node", lambda: "n1")
    assert _actor_weights(cfg, model, alone) == model.weights
    assert not (tmp_path / "digests").exists()
    for cluster in (Cluster((*alone.nodes, Node("n2", "10.0.0.2", 8, 1, 1e9, False))),
                    Cluster(alone.nodes, max_cpus=math.inf, max_gpus=math.inf)):
        driver = _actor_weights(cfg, model, cluster)
        assert driver == f"{model.weights} {model_files.content_digest(options, model.weights)}"
    assert load_model(options, "poison_model:build", weights=driver).weights == model.weights
    elsewhere = f"another-host/boot {'0' * 24} {driver.split()[-1]}"
    assert load_model(options, "poison_model:build", weights=elsewhere).name == model.name
    poison_model.write_options(tmp_path / "model.json", delay=0.2)  # same size, other bytes
    with pytest.raises(ModelError, match="not the bytes the run's driver loaded"):
        load_model(options, "poison_model:build", weights=elsewhere)
