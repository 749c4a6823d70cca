"""Input lists (``--input-list``): text, CSV, Parquet and ORC lists, compressed or not, and
S3 Inventory reports, as S3 writes them (CSV without a header and with form-encoded keys,
ORC, Parquet; every object version, delete markers included)."""

from __future__ import annotations

import gzip
import json
import urllib.parse
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import orc

from pipeline.input_lists import listed_paths
from pipeline.listing import InputError

# An inventory of bucket "photos" that lists every version: two objects with an older version,
# one deleted object (its delete marker is the latest version), keys that need encoding.
VERSIONS = [  # key, is_latest, is_delete_marker, size
    ("cats/tabby 1.jpg", True, False, 1200),
    ("cats/tabby 1.jpg", False, False, 1100),
    ("dogs/c++ & co.png", True, False, 900),
    ("gone.jpg", True, True, None),
    ("gone.jpg", False, False, 500),
    ("émoji/日本 100%.webp", True, False, 42),
]
EXPECTED = [(f"s3://photos/{key}", None)  # no size: it may have changed since the report
            for key in ("cats/tabby 1.jpg", "dogs/c++ & co.png", "émoji/日本 100%.webp")]
LEFT_OUT = {"S3 Inventory: not the latest version": 2, "S3 Inventory: delete marker": 1}
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"


def write_inventory(root: Path, fmt: str, rows=VERSIONS, files: int = 2, bucket: str = "photos",
                    destination: str = "inventory-bucket") -> Path:
    """A report on ``bucket``'s objects as S3 delivers it under ``root`` (the destination
    bucket, synced to disk): inventories/BUCKET/nightly/data/<name>.<ext> and
    inventories/BUCKET/nightly/<date>/manifest.json."""
    config = root / "inventories" / bucket / "nightly"
    (config / "data").mkdir(parents=True)
    keys = []
    for i in range(files):
        part = rows[i::files]
        table = pa.table({
            "bucket": [bucket] * len(part),
            "key": [k for k, *_ in part],
            "version_id": [f"v{j}" for j in range(len(part))],
            "is_latest": [latest for _, latest, _, _ in part],
            "is_delete_marker": [deleted for _, _, deleted, _ in part],
            "size": pa.array([size for *_, size in part], pa.int64()),
            "e_tag": ["abc"] * len(part),
        })
        name = f"data/0c3c-{i}.{'csv.gz' if fmt == 'CSV' else fmt.lower()}"
        if fmt == "CSV":  # no header, every value quoted, keys form-encoded
            lines = [",".join(f'"{v}"' for v in (
                bucket, urllib.parse.quote_plus(k), f"v{j}", str(latest).lower(),
                str(deleted).lower(), "" if size is None else size, "2026-11-01T00:00:00.000Z",
                "abc")) for j, (k, latest, deleted, size) in enumerate(part)]
            (config / name).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
        elif fmt == "ORC":
            orc.write_table(table, config / name)
        else:
            pq.write_table(table, config / name)
        keys.append(f"inventories/{bucket}/nightly/{name}")
    day = config / "2026-11-25T01-00Z"
    day.mkdir()
    schema = CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { required binary bucket; }"
    (day / "manifest.json").write_text(json.dumps({
        "sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30", "fileFormat": fmt, "fileSchema": schema,
        "files": [{"key": k, "size": 1, "MD5checksum": "0"} for k in keys],
    }))
    return day / "manifest.json"


@pytest.mark.parametrize("fmt", ["CSV", "ORC", "Parquet"])
def test_an_s3_inventory_lists_each_objects_latest_version_once(tmp_path, fmt):
    manifest = write_inventory(tmp_path, fmt)
    skipped: Counter = Counter()
    got = sorted(listed_paths(str(manifest), skipped))
    assert got == EXPECTED
    assert skipped == LEFT_OUT


def test_an_inventory_data_file_or_a_table_of_bucket_and_key_lists_objects(tmp_path):
    manifest = write_inventory(tmp_path, "Parquet", files=1)
    (data,) = (manifest.parent.parent / "data").iterdir()
    skipped: Counter = Counter()
    assert sorted(listed_paths(str(data), skipped)) == EXPECTED and skipped == LEFT_OUT
    # A query's output (Athena, DuckDB) with other column spellings, and a path column wins.
    query = tmp_path / "query.csv"
    query.write_text("Bucket,Key,Size\nphotos,a b.jpg,3\nphotos,c+d.jpg,4\n")
    assert list(listed_paths(str(query))) == [("s3://photos/a b.jpg", None),
                                             ("s3://photos/c+d.jpg", None)]
    both = tmp_path / "both.parquet"
    pq.write_table(pa.table({"bucket": ["x"], "key": ["y"], "path": ["/img/1.png"]}), both)
    assert list(listed_paths(str(both))) == [("/img/1.png", None)]


def test_compressed_lists_are_read_by_their_extension(tmp_path):
    paths = [f"/img/{i}.png" for i in range(5)]
    (tmp_path / "list.txt.gz").write_bytes(gzip.compress("\n".join(paths).encode()))
    (tmp_path / "list.csv.gz").write_bytes(gzip.compress(("path\n" + "\n".join(paths)).encode()))
    for name in ("list.txt.gz", "list.csv.gz"):
        assert [p for p, _ in listed_paths(str(tmp_path / name))] == paths, name


def test_a_list_saved_on_windows_is_read_alike(tmp_path):
    """Notepad and Excel start a UTF-8 file with a byte-order mark and end lines with CRLF:
    neither may reach a path."""
    paths = [f"/img/{i}.png" for i in range(3)]
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(paths).encode() + b"\r\n")
    (tmp_path / "list.csv").write_bytes(b"\xef\xbb\xbfpath,label\r\n"
                                        + b"".join(f"{p},1\r\n".encode() for p in paths))
    for name in ("list.txt", "list.csv"):
        assert [p for p, _ in listed_paths(str(tmp_path / name))] == paths, name


def test_a_bad_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "paths.json").write_text(json.dumps(["/img/1.png"]))
    with pytest.raises(InputError, match="not an S3 Inventory manifest.json"):
        list(listed_paths(str(tmp_path / "paths.json")))
    (tmp_path / "cut.json").write_text('{"fileFormat": "CSV", "fil')
    with pytest.raises(InputError, match="Cannot read listing file .*cut.json"):
        list(listed_paths(str(tmp_path / "cut.json")))
    manifest = write_inventory(tmp_path, "CSV")
    for data in (manifest.parent.parent / "data").iterdir():
        data.unlink()
    with pytest.raises(InputError, match="data file 'inventories/photos/nightly/data/0c3c-0"):
        list(listed_paths(str(manifest)))
    spec = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**spec, "fileFormat": "Avro"}))
    with pytest.raises(InputError, match="unknown fileFormat 'Avro'"):
        list(listed_paths(str(manifest)))


def test_a_lists_relative_entries_are_resolved_where_the_command_runs(tmp_path, monkeypatch):
    """Ray's workers may run in another directory (a joined head): relative entries reach the
    listing absolute; URIs stay as they are."""
    from pipeline.source import Source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs.txt").write_text("images/a.png\ns3://photos/b.png\n/abs/c.png\n")
    listing = Source(input_list=True).list("inputs.txt", str(tmp_path / "out"))
    assert listing.read(0, 3).column("path").to_pylist() == [
        f"{tmp_path}/images/a.png", "s3://photos/b.png", "/abs/c.png"]
