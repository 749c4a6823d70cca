"""Bring your own model: the colour-classifier example end to end, and clear failures for bad
factories, with the guarantees of the default model (one compile, per-row errors, resume)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import COMPILES

import pipeline
from pipeline.cli import main
from pipeline.decode import decode_image
from pipeline.infer import Predictor
from pipeline.model import Model, ModelError, ModelSpec, load_model
from pipeline.write import OutputError

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = "examples.color_classifier.color_model:build"
EMBEDDER = "examples.color_classifier.color_model:build_embedder"
SAMPLES = 48  # 8 per colour


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> dict[str, Path]:
    """The README's commands: train the example (shrunk) and write its sample images."""
    work = tmp_path_factory.mktemp("colors")
    result = subprocess.run(
        [sys.executable, "-m", "examples.color_classifier.train", "--output", str(work / "model"),
         "--steps", "80", "--train-images", "600", "--samples", str(work / "images"),
         "--count", str(SAMPLES)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert metrics["heldout_accuracy"] >= 0.9, metrics
    return {"model": work / "model", "images": work / "images"}


def colour_of(path: str) -> str:
    return Path(path).parent.name


def test_example_through_the_cli_with_logits(colors, tmp_path):
    """The documented command in a fresh process: the factory is found from the working
    directory by the driver and by Ray's workers; probabilities and logits in one row."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--model-fn", CLASSIFIER,
         "--model", str(colors["model"]), "--input", str(colors["images"]), "--output", str(out),
         "--top-k", "3", "--logits", "--batch-size", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pq.read_table(out)
    assert table.schema.field("logits").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    assert len(rows) == SAMPLES and all(r["status"] == "ok" for r in rows)
    right = sum(r["label_name"] == colour_of(r["path"]) for r in rows)
    assert right >= 0.9 * SAMPLES, f"{right}/{SAMPLES}"
    for r in rows:
        logits = np.array(r["logits"], np.float64)
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert len(logits) == 6 and int(np.argmax(logits)) == r["label"]
        np.testing.assert_allclose(np.sort(probs)[::-1][:3], r["topk_scores"], rtol=1e-4, atol=1e-6)
    # The fingerprint is the same in another process (a resumed run must recognise it).
    assert {r["model"] for r in rows} == {load_model(colors["model"], CLASSIFIER).fingerprint}
    counts = duckdb.sql(
        f"select label_name, count(*) from read_parquet('{out}/*.parquet') group by 1"
    ).fetchall()
    assert sum(n for _, n in counts) == SAMPLES


def test_embeddings_parquet_duckdb_and_per_row_errors(ray_local, colors, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(colors["images"], src)
    (src / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "emb"
    summary = pipeline.run(str(src), str(out), model_fn=EMBEDDER, model=str(colors["model"]))
    assert summary.rows_ok == SAMPLES and summary.rows_error == 1

    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert "label" not in table.column_names and "logits" not in table.column_names
    rows = {r["path"]: r for r in table.to_pylist()}
    bad = rows.pop(str(src / "red" / "broken.jpg"))
    assert bad["status"] == "error" and bad["embedding"] is None and bad["error"]

    # Run two ways: the pipeline's rows equal the model applied directly to decoded files.
    model = load_model(colors["model"], EMBEDDER)
    paths = sorted(rows)
    direct = model.predict(np.stack([decode_image(Path(p).read_bytes(), model.spec) for p in paths]))
    np.testing.assert_allclose(np.array([rows[p]["embedding"] for p in paths]), direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, rtol=1e-5)

    same, different = duckdb.sql(f"""
        with e as (select path, regexp_extract(path, '/([a-z]+)/[^/]+$', 1) colour, embedding
                   from read_parquet('{out}/*.parquet') where status = 'ok')
        select avg(list_cosine_similarity(a.embedding, b.embedding)) filter (a.colour = b.colour),
               avg(list_cosine_similarity(a.embedding, b.embedding)) filter (a.colour != b.colour)
        from e a, e b where a.path != b.path
    """).fetchall()[0]
    assert same > different + 0.2, (same, different)


def test_one_compile_per_actor_and_padding(colors):
    images = np.stack([
        decode_image(p.read_bytes(), load_model(colors["model"], CLASSIFIER).spec)
        for p in sorted(colors["images"].rglob("*.*"))
    ])  # (48, 48, 64, 3) uint8
    before = COMPILES.count
    predictor = Predictor(str(colors["model"]), CLASSIFIER, batch_size=20, top_k=2, logits=True)
    assert COMPILES.count - before == 1
    outputs = []
    for lo, hi in [(0, 20), (20, 40), (40, 48)]:  # the last batch is padded, not recompiled
        batch = {
            "path": np.array([f"x{i}" for i in range(lo, hi)], dtype=object),
            "image": images[lo:hi],
            "error": np.array([""] * (hi - lo), dtype=object),
            "_t_decode": np.zeros(hi - lo),
        }
        out = predictor(batch)
        assert out["logits"].shape == (hi - lo, 6) and out["topk_labels"].shape == (hi - lo, 2)
        outputs.append(out["logits"])
    assert COMPILES.count - before == 1, "a batch recompiled the model"
    one_by_one = np.concatenate(
        [predictor.executor.run(images[i : i + 1])["logits"] for i in range(len(images))]
    )
    np.testing.assert_allclose(np.concatenate(outputs), one_by_one, atol=1e-4)


def test_resume_keeps_rows_and_refuses_a_changed_model(ray_local, colors, tmp_path):
    out = tmp_path / "out"
    opts = dict(model_fn=CLASSIFIER, model=str(colors["model"]), rows_per_file=12)
    pipeline.run(str(colors["images"]), str(out), **opts)
    parts = sorted(out.glob("part-*.parquet"))  # by listing range
    assert [pq.read_metadata(p).num_rows for p in parts[:2]] == [12, 12]
    assert all(pq.read_metadata(p).num_rows <= 12 for p in parts)
    for part in parts[2:]:  # as if the run had been killed after two commits
        part.unlink()
    first_rows = pq.read_table(parts[0]).to_pylist()

    summary = pipeline.run(str(colors["images"]), str(out), resume=True, **opts)
    assert summary.rows_resumed == 24 and summary.rows_ok == SAMPLES
    table = pq.read_table(out)
    assert table.num_rows == SAMPLES and len(set(table.column("path").to_pylist())) == SAMPLES
    assert pq.read_table(parts[0]).to_pylist() == first_rows  # committed parts untouched

    with pytest.raises(OutputError, match="logits="):
        pipeline.run(str(colors["images"]), str(out), resume=True, logits=True, **opts)
    changed = tmp_path / "changed"
    shutil.copytree(colors["model"], changed)
    meta = json.loads((changed / "model.json").read_text())
    meta["input"]["std"] = [s * 1.01 for s in meta["input"]["std"]]  # preprocessing only
    (changed / "model.json").write_text(json.dumps(meta))
    with pytest.raises(OutputError, match="Cannot resume.*made by model"):
        pipeline.run(str(colors["images"]), str(out), resume=True,
                     **{**opts, "model": str(changed)})
    assert pq.read_table(out).num_rows == SAMPLES


def _tiny_apply(params, x):
    return x.mean(axis=(1, 2)) @ params["w"]  # (B, 3) @ (3, D)


def _tiny_apply_commented(params, x):
    # Same computation, different source text: the fingerprint follows the computation.
    return x.mean(axis=(1, 2)) @ params["w"]


def _tiny(apply=_tiny_apply, w=None, **spec) -> Model:
    w = np.ones((3, 2), np.float32) if w is None else w
    spec = {"height": 8, "width": 6, "channels": 3, "class_names": ("a", "b"), **spec}
    return Model(apply=apply, params={"w": w}, spec=ModelSpec(**spec))


def test_fingerprint_follows_weights_code_and_preprocessing(colors, monkeypatch):
    base = _tiny().fingerprint
    assert _tiny().fingerprint == base
    assert _tiny(apply=_tiny_apply_commented).fingerprint == base
    assert _tiny(apply=lambda p, x: x.max(axis=(1, 2)) @ p["w"]).fingerprint != base
    assert _tiny(w=np.full((3, 2), 2.0, np.float32)).fingerprint != base
    assert _tiny(scale=1.0).fingerprint != base
    assert _tiny(mean=(0.5, 0.4, 0.3)).fingerprint != base
    assert _tiny(class_names=("x", "y")).fingerprint != base

    # A helper that apply calls, not apply itself, changes: so does the fingerprint.
    from examples.color_classifier import color_model

    before = load_model(colors["model"], CLASSIFIER).fingerprint
    original = color_model.embed
    monkeypatch.setattr(color_model, "embed", lambda p, x: original(p, x) * 2.0)
    assert load_model(colors["model"], CLASSIFIER).fingerprint != before


def test_per_channel_normalisation():
    model = _tiny(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    images = np.full((1, 8, 6, 3), 255, np.uint8)
    x = np.asarray(jax.jit(model.spec.normalise)(images))  # what apply receives
    np.testing.assert_allclose(x[0, 0, 0], [1.0, 3.0, 0.5], rtol=1e-6)
    logits = x.mean(axis=(1, 2)) @ model.params["w"]  # (1, 2)
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(model.predict(images), expected, rtol=1e-5)
    with pytest.raises(ModelError, match="mean needs 1 or 3 values"):
        ModelSpec(height=8, width=8, channels=3, class_names=("a",), mean=(0.1, 0.2))
    with pytest.raises(ModelError, match="std must not be 0"):
        ModelSpec(height=8, width=8, channels=1, class_names=("a",), std=0.0)


# Bad factories, imported by name like a user's would be.
def factory_returns_dict(path):
    return {"apply": _tiny_apply}


def factory_takes_nothing():
    return _tiny()


def factory_raises(path):
    raise RuntimeError("weights server unreachable")


def factory_bad_spec(path):
    return _tiny(channels=4)


def factory_apply_fails(path):  # Dense layer sized for another input
    return Model(apply=lambda p, x: x.reshape(x.shape[0], -1) @ p["w"],
                 params={"w": np.zeros((100, 2), np.float32)},
                 spec=ModelSpec(height=8, width=6, channels=3, class_names=("a", "b")))


def factory_wrong_dim(path):
    return _tiny(class_names=("a", "b", "c"))


def factory_returns_tuple(path):
    return _tiny(apply=lambda p, x: (_tiny_apply(p, x), x))


@pytest.mark.parametrize("factory, extra, message", [
    ("no_such_module_xyz:build", [], "cannot be imported: ModuleNotFoundError"),
    ("test_byo_model:no_such_function", [], "has no function 'no_such_function'"),
    ("test_byo_model", [], "must look like 'package.module:function'"),
    ("test_byo_model:factory_takes_nothing", [], "must take one argument"),
    ("test_byo_model:factory_returns_dict", [], "returned dict, expected pipeline.Model"),
    ("test_byo_model:factory_raises", [], "failed: RuntimeError: weights server unreachable"),
    ("test_byo_model:factory_bad_spec", [], "Invalid model spec: channels must be 1 or 3, got 4"),
    ("test_byo_model:factory_apply_fails", [], "apply fails for its declared input (32, 8, 6, 3)"),
    ("test_byo_model:factory_wrong_dim", [], "returns shape (32, 2) for a batch of 32, but its "
     "spec declares 3 class names"),
    ("test_byo_model:factory_returns_tuple", [], "apply returned a tuple, expected one"),
    (CLASSIFIER, [], "pass the checkpoint directory with --model"),
    (EMBEDDER, ["--model", "{model}", "--logits"], "--logits is for classification models"),
])
def test_bad_factory_exits_2_with_one_line_before_any_data(
    factory, extra, message, colors, tmp_path, capsys
):
    # The input does not exist: the model is checked first, so its error is the one reported.
    extra = [a.format(model=colors["model"]) for a in extra]
    code = main(["run", "--input", str(tmp_path / "no-input"), "--output", str(tmp_path / "o"),
                 "--model-fn", factory, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("batch-infer: error: ") and err.count("\n") == 1, err
    assert message in err
    assert f"'{factory}'" in err, "the message names the factory"
    assert not (tmp_path / "o").exists()
