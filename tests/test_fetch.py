"""fetch_all: a decode task's files read through a bounded thread pool, in input order, each
failure its own row; decode_payloads charges each row its wait plus its decode.

The object-store tests read from moto's S3 server on loopback through the delaying proxy of
``pipeline.testing.s3_proxy``, which also counts the requests (HEAD and GET per object, and
how many were in flight at once).
"""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipeline import read
from pipeline.decode import decode_payloads, decode_rows
from pipeline.model import ModelSpec
from pipeline.read import fetch_all, load_bytes
from pipeline.testing.s3_proxy import S3Proxy, moto_server

BUCKET = "fetch-test"
SPEC = ModelSpec(height=16, width=16, channels=1, class_names=("a",))
HEALTHY = 24


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (20, 12), value).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def store():
    """moto on loopback behind the proxy, with HEALTHY images under ok/ and bad objects under
    bad/; this process's S3 filesystem (read._s3) reads through the proxy. Yields (proxy,
    {path: listed size})."""
    with moto_server() as upstream, S3Proxy(upstream, deny=[f"{BUCKET}/bad/denied.jpg"]) as proxy:
        direct = pafs.S3FileSystem(
            endpoint_override=upstream.split("://")[1], scheme="http", region="us-east-1",
            access_key="testing", secret_key="testing", allow_bucket_creation=True,
        )
        direct.create_dir(BUCKET)
        objects = {f"ok/{i:03d}.png": png(i * 10) for i in range(HEALTHY)}
        objects |= {"bad/zero.jpg": b"", "bad/text.jpg": b"not an image at all",
                    "bad/denied.jpg": png(7), "bad/gone.jpg": png(9)}
        for key, data in objects.items():
            with direct.open_output_stream(f"{BUCKET}/{key}") as f:
                f.write(data)
        infos = direct.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
        sizes = {f"s3://{i.path}": i.size for i in infos if i.type == pafs.FileType.File}
        direct.delete_file(f"{BUCKET}/bad/gone.jpg")  # listed, then removed
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", proxy.url)
            mp.setenv("AWS_REGION", "us-east-1")
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            read._s3.cache_clear()
            try:
                yield proxy, sizes
            finally:
                read._s3.cache_clear()


@pytest.fixture
def proxy(store):
    proxy, _ = store
    proxy.delay, proxy.throttle = 0.0, {}
    proxy.reset()
    return proxy


def healthy(store) -> list[str]:
    return sorted(p for p in store[1] if "/ok/" in p)


@pytest.mark.slow
def test_order_is_kept_when_reads_finish_out_of_order(store, proxy):
    paths = healthy(store)
    # The first objects answer last: a pool that yielded as reads finish would reorder them.
    proxy.delay = lambda method, path: 0.3 if path.endswith(("000.png", "001.png")) else 0.01
    got = list(fetch_all(paths, threads=4))
    assert [p for p, _ in got] == paths
    assert [b for _, b in got] == [png(i * 10) for i in range(HEALTHY)]


@pytest.mark.slow
def test_each_bad_object_is_its_own_error_row(store, proxy):
    ok = healthy(store)
    bad = [f"s3://{BUCKET}/bad/{name}" for name in ("zero.jpg", "text.jpg", "denied.jpg",
                                                    "gone.jpg")]
    paths = [ok[0], bad[0], ok[1], bad[1], ok[2], bad[2], ok[3], bad[3], ok[4]]
    for sizes in (None, [store[1][p] for p in paths]):
        rows = decode_payloads(paths, (b for _, b in fetch_all(paths, sizes, threads=3)), SPEC)
        errors = dict(zip(rows["path"], rows["error"]))
        assert [errors[p] for p in ok[:5]] == [""] * 5
        assert errors[bad[0]] == "DecodeError: empty file (0 bytes)"
        assert errors[bad[1]].startswith("DecodeError: not a recognised image format")
        assert "ACCESS_DENIED" in errors[bad[2]]
        assert errors[bad[3]].startswith("FileNotFoundError: ") and "bad/gone.jpg" in errors[bad[3]]
        assert rows["image"][0].mean() == 0 and rows["image"][2].mean() == 10  # ok[1] is 10s


@pytest.mark.slow
def test_a_throttled_read_is_retried_not_written_off(store, proxy):
    """S3 answers 503 SlowDown while it scales a prefix up: a read that meets it three times
    (all of pyarrow's default attempts) used to be an "unreadable" error row."""
    path = healthy(store)[5]
    proxy.throttle = {path.removeprefix("s3://"): 3}
    rows = decode_payloads([path], (b for _, b in fetch_all([path], [store[1][path]])), SPEC)
    assert list(rows["error"]) == [""] and rows["image"][0].mean() == 50
    assert proxy.throttle[path.removeprefix("s3://")] == 0  # all three were met


@pytest.mark.slow
def test_at_most_threads_in_flight_and_a_bounded_read_ahead(store, proxy):
    paths = healthy(store)
    proxy.delay = 0.05
    fetched = fetch_all(paths, threads=4)
    next(fetched)
    time.sleep(1.0)  # an unbounded read-ahead would fetch all 24 objects meanwhile
    read_ahead = proxy.counts(f"/{BUCKET}/ok/")["GET"]
    assert read_ahead <= 1 + 2 * 4  # the one consumed, and a window of 2 x threads
    assert len(list(fetched)) == HEALTHY - 1
    assert proxy.counts(f"/{BUCKET}/ok/")["GET"] == HEALTHY
    assert 3 <= proxy.max_in_flight <= 4  # concurrent, and never more than threads


@pytest.mark.slow
def test_requests_per_object(store, proxy):
    """One GET per object. With the listing's size, no HEAD where pyarrow can open by
    FileInfo; pyarrow 26 cannot (its open_input_file/open_input_stream take a path), so one
    HEAD per object there, and this test holds the code to it when pyarrow can."""
    paths = healthy(store)
    sizes = [store[1][p] for p in paths]
    list(fetch_all(paths, sizes, threads=4))
    head = 0 if read._opens_by_file_info() else HEALTHY
    assert proxy.counts(f"/{BUCKET}/") == {"GET": HEALTHY, **({"HEAD": head} if head else {})}
    proxy.reset()
    list(fetch_all(paths, None, threads=4))
    assert proxy.counts(f"/{BUCKET}/") == {"HEAD": HEALTHY, "GET": HEALTHY}


@pytest.mark.slow
def test_a_rows_seconds_include_waiting_for_its_bytes(store, proxy):
    paths = healthy(store)[:6]
    proxy.delay = 0.05
    start = time.perf_counter()
    rows = decode_payloads(paths, (b for _, b in fetch_all(paths, threads=1)), SPEC)
    wall = time.perf_counter() - start
    assert (rows["_t_decode"] >= 0.05).all()  # each row waited at least one delayed request
    assert 0.9 * wall <= rows["_t_decode"].sum() <= wall


@pytest.mark.slow
def test_concurrent_and_serial_reads_decode_alike(store, proxy):
    paths = healthy(store) + [f"s3://{BUCKET}/bad/text.jpg"]
    serial = decode_rows(paths, load_bytes, SPEC)
    concurrent = decode_payloads(paths, (b for _, b in fetch_all(paths, threads=8)), SPEC)
    for column in ("path", "image", "error"):
        np.testing.assert_array_equal(serial[column], concurrent[column])


def test_local_special_files_are_refused_as_before(tmp_path):
    (tmp_path / "ok.png").write_bytes(png(3))
    os.mkfifo(tmp_path / "fifo.png")  # reading would wait for a writer forever
    os.symlink(tmp_path / "missing.png", tmp_path / "broken.png")
    os.symlink("/dev/zero", tmp_path / "endless.png")  # reading would never end
    names = ["ok.png", "fifo.png", "broken.png", "endless.png", "vanished.png"]
    paths = [str(tmp_path / n) for n in names]
    for threads in (1, 4):
        got = dict(fetch_all(paths, threads=threads))
        assert list(got) == paths
        assert got[paths[0]] == png(3)
        assert "named pipe (FIFO), not a regular file" in str(got[paths[1]])
        assert "broken symbolic link" in str(got[paths[2]])
        assert "character device, not a regular file" in str(got[paths[3]])
        assert "no longer exists (removed or renamed after listing)" in str(got[paths[4]])


def test_stopping_early_leaves_no_read_running(tmp_path):
    paths = []
    for i in range(50):
        paths.append(str(tmp_path / f"{i}.png"))
        (tmp_path / f"{i}.png").write_bytes(png(i))
    fetched = fetch_all(paths, threads=4)
    assert next(fetched) == (paths[0], png(0))
    fetched.close()  # the pool is shut down, its queued reads cancelled
    deadline = time.monotonic() + 5
    while any(t.name.startswith("fetch") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "fetch threads still running"
        time.sleep(0.01)


def test_sizes_must_align_with_paths():
    with pytest.raises(ValueError, match="2 sizes for 1 paths"):
        list(fetch_all(["a.png"], [1, 2]))
