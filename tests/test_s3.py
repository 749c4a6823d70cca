"""s3:// in and out against a real S3 API: moto's server on 127.0.0.1, started by the test.

Ray starts before the AWS_* variables are set, so its worker processes do not inherit them:
the decode tasks can only reach the server because the pipeline hands them the driver's
settings (runtime_env), as it must on a cluster whose nodes were started elsewhere.
"""

from __future__ import annotations

import socket

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import label_of

import pipeline

pytestmark = pytest.mark.slow

BUCKET = "batch-infer-test"


@pytest.fixture(scope="module")
def s3(ray_local, sample_dir):
    """A moto S3 server on loopback holding the sample images; yields a pyarrow S3 filesystem."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        from pipeline import read

        read._s3.cache_clear()  # the driver's cached filesystem must see this endpoint
        fs = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
            access_key="testing", secret_key="testing", allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        for path in sorted(sample_dir.rglob("*.*")):
            with fs.open_output_stream(f"{BUCKET}/in/{path.relative_to(sample_dir)}") as f:
                f.write(path.read_bytes())
        with fs.open_output_stream(f"{BUCKET}/in/3/broken.jpg") as f:
            f.write(b"this is not a jpeg")
        with fs.open_output_stream(f"{BUCKET}/in/README.txt") as f:
            f.write(b"skipped by extension")
        try:
            yield fs
        finally:
            read._s3.cache_clear()
            server.stop()


def test_s3_images_to_s3_parquet(s3, sample_dir):
    out = f"s3://{BUCKET}/out"
    summary = pipeline.run(f"s3://{BUCKET}/in", out, rows_per_file=16)
    assert (summary.rows_ok, summary.rows_error) == (40, 1)
    assert summary.skipped == {"not an image extension": 1}

    names = {i.base_name for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out"))}
    assert {"_manifest.json", "_summary.json"} <= names
    assert len([n for n in names if n.startswith("part-")]) == 3
    assert not any(n.startswith("_tmp") for n in names)

    rows = pq.read_table(f"{BUCKET}/out", filesystem=s3).to_pylist()
    assert len(rows) == 41
    expected = {f"s3://{BUCKET}/in/{p.relative_to(sample_dir)}" for p in sample_dir.rglob("*.*")}
    assert {r["path"] for r in rows} == expected | {f"s3://{BUCKET}/in/3/broken.jpg"}
    (bad,) = [r for r in rows if r["status"] == "error"]
    assert bad["path"] == f"s3://{BUCKET}/in/3/broken.jpg"
    assert "not a recognised image format" in bad["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert sum(r["label_name"] == label_of(r["path"]) for r in ok) >= 38


def test_s3_resume_skips_committed_rows(s3):
    out = f"s3://{BUCKET}/resume"
    pipeline.run(f"s3://{BUCKET}/in/[0-4]/*", out)
    first = pq.read_table(f"{BUCKET}/resume", filesystem=s3).num_rows
    assert 0 < first < 41
    # Same listing, same output: everything is already committed.
    again = pipeline.run(f"s3://{BUCKET}/in/[0-4]/*", out, resume=True)
    assert again.rows_resumed == first and again.rows_ok + again.rows_error == first
    assert pq.read_table(f"{BUCKET}/resume", filesystem=s3).num_rows == first


def test_missing_bucket_prefix_is_one_clear_error(s3, tmp_path):
    from pipeline.listing import InputError

    with pytest.raises(InputError, match=f"s3://{BUCKET}/nothing-here"):
        pipeline.run(f"s3://{BUCKET}/nothing-here", str(tmp_path / "out"))
