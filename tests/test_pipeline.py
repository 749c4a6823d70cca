"""End to end on a local Ray: N images in, N rows out, exact schema, right labels."""

from __future__ import annotations

import json
import shutil

import duckdb
import poison_model
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import label_of

import pipeline
from pipeline.write import OutputError

EXPECTED_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False), pa.field("status", pa.string(), nullable=False),
    ("error", pa.string()), ("error_kind", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
    ("score", pa.float32()), ("topk_labels", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())), pa.field("model", pa.string(), nullable=False),
])


def test_directory_to_parquet(ray_local, sample_dir, tmp_path):
    out = tmp_path / "out"
    summary = pipeline.run(str(sample_dir), str(out), rows_per_file=16)
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == EXPECTED_SCHEMA
    assert table.num_rows == 40 and summary.rows_ok == 40 and summary.rows_error == 0
    rows = table.to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in sample_dir.rglob("*.*"))
    correct = sum(r["label_name"] == label_of(r["path"]) for r in rows)
    assert correct >= 38, f"{correct}/40 right"
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert all(len(r["topk_labels"]) == 5 and r["topk_labels"][0] == r["label"] for r in rows)
    assert all(r["score"] == r["topk_scores"][0] for r in rows)
    assert {r["model"] for r in rows} == {pipeline.load_model().fingerprint}
    assert len(list(out.glob("part-*.parquet"))) == 3  # 40 rows at 16 per file
    assert not list(out.glob("_tmp-*"))
    saved = json.loads((out / "_summary.json").read_text())
    assert saved["completed"] and saved["rows_ok"] == 40
    assert set(saved["stage_seconds"]) == {"decode", "dispatch", "wait", "infer", "write"}
    count = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    assert count == 40


def test_corrupt_file_is_one_error_row(ray_local, sample_dir, tmp_path):
    """Then resuming the finished run computes nothing: the model (the bundled CNN with a call
    log) is not called at all. Rules out a resume that recomputes every row and relies on
    the writer to drop the ones already written."""
    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    (src / "3" / "broken.jpg").write_text("this is not a jpeg")
    (src / "notes.txt").write_text("skipped by extension")
    calls = tmp_path / "calls"
    model = {"model_fn": "poison_model:build",
             "model": poison_model.write_options(tmp_path / "model.json", calls=str(calls))}
    summary = pipeline.run(str(src), str(tmp_path / "out"), **model)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 41
    errors = [r for r in rows if r["status"] == "error"]
    assert [r["path"] for r in errors] == [str(src / "3" / "broken.jpg")]
    assert "not a recognised image format" in errors[0]["error"]
    assert errors[0]["label"] is None and errors[0]["topk_labels"] is None
    assert summary.rows_error == 1 and summary.rows_ok == 40
    assert summary.skipped == {"not an image extension: .txt": 1}
    assert sum(c.images for c in poison_model.read_calls(calls)) == 40  # the 40 decoded images
    # Resuming the finished run computes nothing and still counts the earlier rows by status.
    calls.unlink()
    again = pipeline.run(str(src), str(tmp_path / "out"), resume=True, **model)
    assert (again.rows_resumed, again.rows_ok, again.rows_error) == (41, 40, 1)
    assert poison_model.read_calls(calls) == [], "resuming a finished run called the model"


def test_single_file_and_glob_inputs(ray_local, sample_dir, tmp_path):
    one = next(sample_dir.rglob("*.png"))
    pipeline.run(str(one), str(tmp_path / "one"))
    assert pq.read_table(tmp_path / "one").column("path").to_pylist() == [str(one)]
    pipeline.run(f"{sample_dir}/**/*.jpg", str(tmp_path / "glob"))
    paths = pq.read_table(tmp_path / "glob").column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in sample_dir.rglob("*.jpg"))


def test_existing_output_needs_overwrite_or_resume(ray_local, sample_dir, tmp_path):
    out = tmp_path / "out"
    pipeline.run(str(sample_dir), str(out))
    with pytest.raises(OutputError, match="--overwrite"):
        pipeline.run(str(sample_dir), str(out))
    summary = pipeline.run(str(sample_dir), str(out), resume=True)
    assert summary.rows_resumed == 40 and summary.rows_ok == 40
    assert pq.read_table(out).num_rows == 40
    pipeline.run(str(sample_dir), str(out), overwrite=True, top_k=2)
    table = pq.read_table(out)
    assert table.num_rows == 40
    assert {len(v) for v in table.column("topk_labels").to_pylist()} == {2}
    with pytest.raises(OutputError, match="compute_dtype=float32, this run asks for compute_dtype=bfloat16"):
        pipeline.run(str(sample_dir), str(out), resume=True, top_k=2, compute_dtype="bfloat16")


def test_a_model_file_rewritten_during_a_run_stops_it(ray_local, sample_dir, tmp_path,
                                                      monkeypatch):
    """The driver fingerprints the weights it loaded; an actor on its machine that loads them
    after they were rewritten (a training job saving to the same path) stops the run with one
    line instead of writing rows of other weights under the first fingerprint."""
    import os

    from pipeline import runner
    from pipeline.model import ModelError
    from pipeline.models import digits_cnn

    checkpoint = tmp_path / "model"  # a folder: model.json and weights.npz
    checkpoint.mkdir()
    for name in (digits_cnn.META_FILE, digits_cnn.WEIGHTS_FILE):
        shutil.copy(digits_cnn.BUNDLED_DIR / name, checkpoint / name)
    weights, load_model = checkpoint / digits_cnn.WEIGHTS_FILE, runner.load_model

    def load_then_rewrite(*args, **kwargs):
        model = load_model(*args, **kwargs)
        st = os.stat(weights)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # saved again
        return model

    monkeypatch.setattr(runner, "load_model", load_then_rewrite)
    with pytest.raises(ModelError, match=f"The model weights at '{checkpoint}' changed after "
                                         "this run started"):
        pipeline.run(str(sample_dir), str(tmp_path / "out"), model=str(checkpoint))
    assert not list((tmp_path / "out").glob("part-*"))
    monkeypatch.undo()  # unchanged weights: the same run goes through
    summary = pipeline.run(str(sample_dir), str(tmp_path / "out"), model=str(checkpoint))
    assert summary.rows_ok == 40
    # A factory that writes a converted copy beside its weights on first load (in the
    # driver) has not changed them for the actors.
    summary = pipeline.run(str(sample_dir), str(tmp_path / "out"), overwrite=True,
                           model_fn="test_pipeline:converting_digits", model=str(checkpoint))
    assert summary.rows_ok == 40 and (checkpoint / "converted.cache").exists()


def converting_digits(path: str):
    """Model factory: the digits CNN at ``path``, which it first "converts" once into a file
    beside the weights, as factories that cache a conversion do."""
    from pathlib import Path

    from pipeline.models import digits_cnn

    converted = Path(path) / "converted.cache"
    if not converted.exists():
        converted.write_bytes(b"converted")
    return digits_cnn.build(path)
