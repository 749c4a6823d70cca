"""Tar shards (webdataset layout) and Parquet files of image bytes: real files, real pipeline.

The readers are checked directly on hand-made archives (corrupt members, truncation, hostile
member names), then through ``pipeline.run`` and the CLI, and --resume over shards.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import poison_model
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from driver import Driver

import pipeline
from pipeline import source
from pipeline.cli import main
from pipeline.listing import InputError
from pipeline.shards import ShardError, parquet_rows, tar_rows

NOT_AN_IMAGE = b"this is not an image"


def _samples(sample_dir: Path) -> list[Path]:
    return sorted(sample_dir.rglob("*.*"))


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _webdataset(images: list[Path], start: int) -> list[tuple[str, bytes]]:
    """Members as img2dataset writes them: KEY.jpg|png, KEY.cls (the label), KEY.json."""
    members = []
    for i, path in enumerate(images, start):
        key = f"{i:06d}"
        members += [
            (f"{key}{path.suffix}", path.read_bytes()),
            (f"{key}.cls", path.parent.name.encode()),
            (f"{key}.json", b'{"source": "%s"}' % path.name.encode()),
        ]
    return members


def _rows(rows) -> dict[str, bytes | BaseException]:
    out = {}
    for path, payload in rows:
        assert path not in out, f"row {path} twice"
        out[path] = payload
    return out


# --- the tar reader, directly -----------------------------------------------------------------


def test_tar_groups_by_key_and_picks_the_image_member(sample_dir):
    images = _samples(sample_dir)[:4]
    members = _webdataset(images, 0) + [
        ("000000.png", b"second image of sample 000000"),  # not a sample of its own
        ("000007.seg.png", images[0].read_bytes()),  # extension 'seg.png': a field, not the image
        ("sub.dir/000008.jpeg", images[1].read_bytes()),  # keys may have directories with dots
        ("000009.jpg", NOT_AN_IMAGE),  # corrupt data is decode's business, not the reader's
    ]
    rows = _rows(tar_rows("s/a.tar", _tar(members)))
    expected = [f"s/a.tar/{i:06d}{p.suffix}" for i, p in enumerate(images)]
    assert list(rows) == expected + ["s/a.tar/sub.dir/000008.jpeg", "s/a.tar/000009.jpg"]
    assert rows[expected[0]] == images[0].read_bytes()
    assert rows["s/a.tar/000009.jpg"] == NOT_AN_IMAGE


def test_tar_member_names_are_never_paths_on_disk(sample_dir, tmp_path, monkeypatch):
    """Hostile member names are error rows, and nothing is written anywhere.

    Every place such a name could land is inside ``tmp_path``, which the test watches: the
    process's working directory and its temporary directory are three levels down, so each
    ``../`` lands in a watched directory, and the absolute name points into ``tmp_path`` too.
    Rules out a reader that extracts the shard (or a member) to disk, even to a scratch
    directory it removes: a traversing member would be left outside it, and
    ``TarFile.extract``/``extractall`` fail the test when called at all."""
    work = tmp_path / "a" / "b" / "c"
    (work / "tmp").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(work / "tmp"))

    def no_extraction(*args, **kwargs):
        raise AssertionError("the tar reader extracted a member to disk")

    monkeypatch.setattr(tarfile.TarFile, "extract", no_extraction)
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_extraction)
    image = _samples(sample_dir)[0].read_bytes()
    hostile = ["../evil1.png", "../../evil2.png", f"{tmp_path}/abs/evil3.png",
               "a/../../evil4.png", "../../../evil5.png"]
    before = sorted(tmp_path.rglob("*"))
    rows = _rows(tar_rows("s/h.tar", _tar([(n, image) for n in hostile] + [("ok.png", image)])))
    assert rows["s/h.tar/ok.png"] == image
    for name in hostile:
        err = rows[f"s/h.tar/{name}"]
        assert isinstance(err, ShardError) and "absolute or contains '..'" in str(err)
    assert sorted(tmp_path.rglob("*")) == before, "the reader wrote files"


def test_truncated_and_corrupt_tars_keep_what_they_can(sample_dir):
    data = _tar(_webdataset(_samples(sample_dir)[:6], 0))
    whole = _rows(tar_rows("s/t.tar", data))
    assert len(whole) == 6 and not any(isinstance(v, BaseException) for v in whole.values())

    cut = _rows(tar_rows("s/t.tar", data[: len(data) // 2]))  # cut inside a member
    ok = [p for p, v in cut.items() if isinstance(v, bytes)]
    assert 0 < len(ok) < 6 and all(cut[p] == whole[p] for p in ok)
    assert "tar shard unreadable after" in str(cut["s/t.tar"])

    # Cut exactly between two members: tarfile itself would just stop there.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar]
    at_boundary = _rows(tar_rows("s/t.tar", data[: offsets[9]]))
    assert "without its end marker" in str(at_boundary["s/t.tar"])
    assert len(at_boundary) == 4  # 3 samples (9 members) read, then the shard's error row

    garbled = bytearray(data)
    garbled[offsets[6] : offsets[6] + 512] = b"\x7f" * 512  # sample 3's image header
    rows = _rows(tar_rows("s/t.tar", bytes(garbled)))
    assert len([v for v in rows.values() if isinstance(v, bytes)]) == 2
    assert "unreadable tar header" in str(rows["s/t.tar"])

    for junk in (b"", NOT_AN_IMAGE * 100):
        (only,) = _rows(tar_rows("s/j.tar", junk)).items()
        assert only[0] == "s/j.tar" and isinstance(only[1], ShardError)

    gz = _rows(tar_rows("s/t.tar.gz", gzip.compress(data)))
    assert {p.replace(".tar.gz", ".tar"): v for p, v in gz.items()} == whole


# --- the Parquet reader, directly -------------------------------------------------------------


def _parquet(path: Path, ids: list, images: list, **kwargs) -> Path:
    table = pa.table({
        "id": ids,
        "image": pa.array(images, pa.binary()),
        "caption": [f"c{i}" for i in range(len(ids))],
    })
    pq.write_table(table, path, **kwargs)
    return path


def test_a_reader_that_raises_ends_its_shard_with_one_error_row(tmp_path, monkeypatch):
    """An exception the reader does not expect (a member too big for memory, say) would fail
    the decode task and so the run; it ends the shard as a cut does instead."""
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"whatever")

    def reader(path, data):
        yield f"{path}/0.png", b"image 0"
        yield f"{path}/1.png", b"image 1"
        raise MemoryError("cannot allocate 21474836480 bytes")

    monkeypatch.setattr(source, "tar_rows", reader)
    rows = _rows(source.Source("tar")._expand(str(shard), None))
    assert list(rows)[:2] == [f"{shard}/0.png", f"{shard}/1.png"]
    error = rows[str(shard)]
    assert isinstance(error, ShardError) and str(error) == (
        "tar shard unreadable after 2 rows: MemoryError: cannot allocate 21474836480 bytes")
    assert len(rows) == 3


def test_parquet_rows_by_id_with_bad_rows_as_errors(sample_dir, tmp_path):
    images = [p.read_bytes() for p in _samples(sample_dir)[:6]]
    ids = ["a", "b", None, "b", "e", "f"]
    values = images[:4] + [None, NOT_AN_IMAGE]
    path = _parquet(tmp_path / "x.parquet", ids, values)
    rows = _rows(parquet_rows("s/x.parquet", path.read_bytes(), "image", "id"))
    tails = ("a", "b", "#row-2", "#row-3", "e", "f")
    assert list(rows) == [f"s/x.parquet/{tail}" for tail in tails]
    assert rows["s/x.parquet/a"] == images[0] and rows["s/x.parquet/f"] == NOT_AN_IMAGE
    assert "is null in row 2" in str(rows["s/x.parquet/#row-2"])
    assert "repeats (first in row 1)" in str(rows["s/x.parquet/#row-3"])
    assert "'image' is null" in str(rows["s/x.parquet/e"])

    (only,) = _rows(parquet_rows("s/x.parquet", path.read_bytes(), "jpg", "id")).items()
    assert only[0] == "s/x.parquet" and "no column 'jpg'" in str(only[1])


def test_parquet_corrupt_row_group_loses_only_its_rows(sample_dir, tmp_path):
    images = [p.read_bytes() for p in _samples(sample_dir)[:9]]
    path = _parquet(tmp_path / "g.parquet", [f"r{i}" for i in range(9)], images, row_group_size=3)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)  # group 1's image column
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 16] = b"\xff" * 16  # its page header
    rows = _rows(parquet_rows("s/g.parquet", bytes(data), "image", "id"))
    assert [p for p, v in rows.items() if isinstance(v, bytes)] == [
        f"s/g.parquet/r{i}" for i in (0, 1, 2, 6, 7, 8)
    ]
    assert "row group 1 unreadable" in str(rows["s/g.parquet/#row-group-1"])


def test_parquet_hugging_face_image_struct(sample_dir, tmp_path):
    image = _samples(sample_dir)[0].read_bytes()
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    struct = pa.array([{"bytes": image, "path": "x.png"}], hf_type)
    pq.write_table(pa.table({"id": [7], "image": struct}), tmp_path / "hf.parquet")
    data = (tmp_path / "hf.parquet").read_bytes()
    rows = _rows(parquet_rows("s/hf.parquet", data, "image", "id"))
    assert rows == {"s/hf.parquet/7": image}


def test_parquet_hugging_face_image_struct_without_bytes_reads_its_path(sample_dir, tmp_path):
    """A dataset saved without embedding its images (``to_parquet`` of an ``imagefolder``)
    names each image by path: absolute, or relative to the Parquet file."""
    images = _samples(sample_dir)[:2]
    (tmp_path / "beside.png").write_bytes(images[1].read_bytes())
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    struct = pa.array([{"bytes": None, "path": str(images[0])},
                       {"bytes": None, "path": "beside.png"},
                       {"bytes": None, "path": str(tmp_path / "gone.png")},
                       {"bytes": None, "path": None}], hf_type)
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "image": struct}), tmp_path / "hf.parquet")
    rows = _rows(parquet_rows(str(tmp_path / "hf.parquet"),
                              (tmp_path / "hf.parquet").read_bytes(), "image", "id"))
    shard = tmp_path / "hf.parquet"
    assert rows[f"{shard}/1"] == images[0].read_bytes()
    assert rows[f"{shard}/2"] == images[1].read_bytes()
    gone = rows[f"{shard}/3"]
    assert str(gone) == (f"'image' holds no bytes, only a path, and it cannot be read: "
                         f"'{tmp_path}/gone.png' does not exist") and gone.kind == "unreadable"
    assert str(rows[f"{shard}/4"]) == "'image' is null"


# --- through the pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tar_shards(sample_dir, tmp_path_factory) -> Path:
    """3 tar shards of the 40 samples (one gzipped) + a corrupt member, a truncated shard and a
    non-tar file named .tar; README.txt is skipped by extension."""
    root = tmp_path_factory.mktemp("tars")
    images = _samples(sample_dir)
    corrupt = [("000099.jpg", NOT_AN_IMAGE)]
    (root / "shard-000.tar").write_bytes(_tar(_webdataset(images[:20], 0) + corrupt))
    (root / "shard-001.tar.gz").write_bytes(gzip.compress(_tar(_webdataset(images[20:35], 20))))
    data = _tar(_webdataset(images[35:], 35))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        fourth_image = tar.getmembers()[9]
    (root / "shard-002.tar").write_bytes(data[: fourth_image.offset_data + 10])  # cut in transit
    (root / "shard-003.tar").write_bytes(NOT_AN_IMAGE)
    (root / "README.txt").write_text("skipped")
    return root


def test_tar_shards_through_the_pipeline(ray_local, tar_shards, sample_dir, tmp_path):
    out = tmp_path / "out"
    summary = pipeline.run(str(tar_shards), str(out), input_format="tar", rows_per_file=16)
    rows = pq.read_table(out).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows) == summary.rows_ok + summary.rows_error
    assert summary.skipped == {"not a tar shard extension: .txt": 1}

    images = _samples(sample_dir)
    shard0 = [f"{tar_shards}/shard-000.tar/{i:06d}{p.suffix}" for i, p in enumerate(images[:20])]
    shard1 = [
        f"{tar_shards}/shard-001.tar.gz/{i:06d}{p.suffix}" for i, p in enumerate(images[20:35], 20)
    ]
    for path, image in zip(shard0 + shard1, images[:35]):
        assert by_path[path]["status"] == "ok"
    right = sum(by_path[p]["label_name"] == i.parent.name for p, i in zip(shard0 + shard1, images))
    assert right >= 33, f"{right}/35"
    corrupt = by_path[f"{tar_shards}/shard-000.tar/000099.jpg"]
    assert "not a recognised image format" in corrupt["error"]
    cut = sorted(p for p in by_path if p.startswith(f"{tar_shards}/shard-002.tar/"))
    assert [by_path[p]["status"] for p in cut] == ["ok", "ok", "ok", "error"]
    assert "'000038.jpg' is truncated" in by_path[cut[-1]]["error"]
    assert "unreadable after 4 image members" in by_path[f"{tar_shards}/shard-002.tar"]["error"]
    assert by_path[f"{tar_shards}/shard-003.tar"]["status"] == "error"
    assert summary.rows_ok == 35 + 3
    assert summary.rows_error == 4  # corrupt member, cut member, cut shard, not-a-tar shard


def committed(out: Path) -> dict[str, str]:
    """path -> status of the rows in the part files committed so far (what a reader sees)."""
    rows: dict[str, str] = {}
    for part in sorted(out.glob("*.parquet")):
        if not part.name.startswith(("_", ".")):
            table = pq.read_table(part, columns=["path", "status"])
            for path, status in zip(*(table.column(c).to_pylist() for c in ("path", "status"))):
                assert path not in rows, f"row {path} committed twice"
                rows[path] = status
    return rows


def ok_images(rows: dict[str, str]) -> int:
    """Rows that reached the model: the ok ones (the fixture's error rows fail in decode)."""
    return sum(status == "ok" for status in rows.values())


def test_tar_resume_gives_each_row_exactly_once(ray_local, tar_shards, tmp_path):
    """Every other part file of a finished run is lost; --resume rewrites exactly those rows
    and the model sees exactly their images. Rules out a resume that recomputes every row
    and relies on the writer to drop those already written."""
    out, calls = tmp_path / "out", tmp_path / "calls"
    model = {"model_fn": "poison_model:build",
             "model": poison_model.write_options(tmp_path / "model.json", calls=str(calls))}
    first = pipeline.run(str(tar_shards), str(out), input_format="tar", rows_per_file=7, **model)
    total = first.rows_ok + first.rows_error
    assert sum(c.images for c in poison_model.read_calls(calls)) == first.rows_ok
    parts = sorted(out.glob("part-*.parquet"))
    kept = sum(pq.read_metadata(p).num_rows for p in parts[::2])
    lost = {r["path"]: r["status"] for p in parts[1::2] for r in pq.read_table(p).to_pylist()}
    for part in parts[1::2]:  # as if the run had died before committing these
        part.unlink()
    calls.unlink()
    again = pipeline.run(str(tar_shards), str(out), input_format="tar", resume=True, **model)
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert len(paths) == total and not [p for p, n in Counter(paths).items() if n > 1]
    assert again.rows_resumed == kept and again.rows_ok + again.rows_error == total
    assert sum(c.images for c in poison_model.read_calls(calls)) == ok_images(lost), (
        "the resume computed other rows than the lost ones")


@pytest.mark.slow
def test_tar_run_killed_then_resumed_computes_only_the_rest(ray_local, tar_shards, tmp_path):
    """The real ``batch-infer run`` over the shards is SIGKILLed once some rows are committed
    (each model call sleeps 0.3 s; 4 rows per call and per part file); --resume then gives
    every row exactly once, and the model sees only the images of the rows not committed.
    Rules out a resume that recomputes every row and relies on the writer to drop those
    already written, and one that loses the rows of a half-read shard."""
    out, calls = tmp_path / "out", tmp_path / "calls"
    options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.3)
    driver = Driver(["run", "--input", tar_shards, "--output", out, "--input-format", "tar",
                     "--model-fn", "poison_model:build", "--model", options, "--batch-size", 4,
                     "--rows-per-file", 4, "--actors", 1, "--no-progress"], tmp_path)
    try:
        driver.wait_until(lambda: len(committed(out)) >= 8, "8 committed rows")
    finally:
        driver.kill()
    before = committed(out)
    calls.unlink()

    again = pipeline.run(str(tar_shards), str(out), input_format="tar", resume=True,
                         model_fn="poison_model:build", model=options)
    rows = committed(out)
    assert 8 <= len(before) < len(rows) == 42  # 38 ok, 4 error (see test_tar_shards_through...)
    assert (again.rows_ok, again.rows_error, again.rows_resumed) == (38, 4, len(before))
    assert {p: s for p, s in rows.items() if p in before} == before
    assert sum(c.images for c in poison_model.read_calls(calls)) == 38 - ok_images(before), (
        "the resume computed rows that were already committed")


def test_parquet_files_through_the_cli(ray_local, sample_dir, tmp_path, capsys):
    images = _samples(sample_dir)
    src = tmp_path / "pq"
    src.mkdir()
    for n, chunk in enumerate((images[:25], images[25:])):
        table = pa.table({
            "key": [f"{n}-{i:03d}" for i in range(len(chunk))],
            "jpg": pa.array([p.read_bytes() for p in chunk], pa.binary()),
            "label": [int(p.parent.name) for p in chunk],
        })
        pq.write_table(table, src / f"part-{n}.parquet", row_group_size=10)
    (src / "part-2.parquet").write_bytes(NOT_AN_IMAGE)
    out = tmp_path / "out"
    argv = ["run", "--input", str(src), "--output", str(out), "--input-format", "parquet",
            "--no-progress"]
    assert main(argv) == 2  # default column names: one clear line before any work
    assert "has no column 'image' or 'id'" in capsys.readouterr().err
    assert main([*argv, "--image-column", "jpg", "--id-column", "key"]) == 0
    assert "rows: 41 (40 ok, 1 error)" in capsys.readouterr().out
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    for n, chunk in enumerate((images[:25], images[25:])):
        for i, image in enumerate(chunk):
            assert rows[f"{src}/part-{n}.parquet/{n}-{i:03d}"]["status"] == "ok"
    assert rows[f"{src}/part-2.parquet"]["status"] == "error"
    # Other ids would be other rows: resuming with another id column is refused.
    assert main([*argv, "--image-column", "jpg", "--id-column", "label", "--resume"]) == 2
    assert "it was read as" in capsys.readouterr().err


def test_wrong_format_says_what_it_found(ray_local, tar_shards, tmp_path):
    found = (r"holds no images \(5 files, none with an image extension: 3 \.tar, 1 \.txt, "
             r"1 \.tar\.gz\)\. "
             r"Tar shards\? Pass --input-format tar\.")
    with pytest.raises(InputError, match=found):
        pipeline.run(str(tar_shards), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "_manifest.json")
