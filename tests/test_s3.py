"""s3:// in and out against a real S3 API: moto's server on 127.0.0.1, started by the test.

Ray starts before the AWS_* variables are set, so its worker processes do not inherit them:
the decode tasks can only reach the server because the pipeline hands them the driver's
settings (runtime_env), as it must on a cluster whose nodes were started elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import time

import poison_model
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import label_of
from driver import Driver
from test_input_lists import write_inventory

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
        for hidden in ("in/3/._broken.jpg", "in/.thumbnails/3/x.png"):  # a Mac's, a viewer's
            with fs.open_output_stream(f"{BUCKET}/{hidden}") as f:
                f.write(b"\x00\x05\x16\x07 hidden")
        try:
            yield fs
        finally:
            read._s3.cache_clear()
            server.stop()


def test_s3_images_to_s3_parquet(s3, sample_dir):
    out = f"s3://{BUCKET}/out"
    summary = pipeline.run(f"s3://{BUCKET}/in", out, rows_per_file=16)
    assert (summary.rows_ok, summary.rows_error) == (40, 1)
    assert summary.skipped == {"not an image extension: .txt": 1,
                               "hidden, a name starting with '.'": 2}

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


def committed(fs: pafs.FileSystem, prefix: str) -> dict[str, str]:
    """path -> status of the rows in the part files under BUCKET/prefix (what a reader sees)."""
    selector = pafs.FileSelector(f"{BUCKET}/{prefix}", allow_not_found=True)
    rows: dict[str, str] = {}
    for info in sorted(fs.get_file_info(selector), key=lambda i: i.path):
        if info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", ".")):
            table = pq.read_table(info.path, filesystem=fs, columns=["path", "status"])
            for path, status in zip(*(table.column(c).to_pylist() for c in ("path", "status"))):
                assert path not in rows, f"row {path} committed twice"
                rows[path] = status
    return rows


def test_s3_resume_skips_committed_rows(s3, tmp_path):
    """Resuming a finished run calls the model on nothing. Rules out a resume that recomputes
    every row and relies on the writer to drop those already written."""
    out, calls = f"s3://{BUCKET}/resume", tmp_path / "calls"
    model = {"model_fn": "poison_model:build",
             "model": poison_model.write_options(tmp_path / "model.json", calls=str(calls))}
    first = pipeline.run(f"s3://{BUCKET}/in/[0-4]/*", out, **model)
    rows = first.rows_ok + first.rows_error
    assert 0 < rows == pq.read_table(f"{BUCKET}/resume", filesystem=s3).num_rows < 41
    assert sum(c.images for c in poison_model.read_calls(calls)) == first.rows_ok
    # Same listing, same output: everything is already committed.
    calls.unlink()
    again = pipeline.run(f"s3://{BUCKET}/in/[0-4]/*", out, resume=True, **model)
    assert again.rows_resumed == rows and again.rows_ok + again.rows_error == rows
    assert pq.read_table(f"{BUCKET}/resume", filesystem=s3).num_rows == rows
    assert poison_model.read_calls(calls) == [], "resuming a finished run called the model"


def test_s3_run_killed_then_resumed_computes_only_the_rest(s3, tmp_path):
    """The real ``batch-infer run`` from S3 to S3 is SIGKILLed once some rows are committed
    (each model call sleeps 0.3 s; 2 rows per call and per part file); --resume then gives
    every object exactly one row, and the model sees only the images not committed before.
    Rules out a resume on S3 that recomputes every row (the writer dropping duplicates)."""
    out, calls = f"s3://{BUCKET}/killed", tmp_path / "calls"
    options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.3)
    driver = Driver(["run", "--input", f"s3://{BUCKET}/in", "--output", out,
                     "--model-fn", "poison_model:build", "--model", options, "--batch-size", 2,
                     "--rows-per-file", 2, "--actors", 1, "--no-progress"], tmp_path)
    try:
        driver.wait_until(lambda: len(committed(s3, "killed")) >= 4, "4 committed rows")
    finally:
        driver.kill()
    before = committed(s3, "killed")
    calls.unlink()

    again = pipeline.run(f"s3://{BUCKET}/in", out, resume=True, model_fn="poison_model:build",
                         model=options)
    rows = committed(s3, "killed")
    assert 4 <= len(before) < len(rows) == 41  # 40 images and broken.jpg
    assert (again.rows_ok, again.rows_error, again.rows_resumed) == (40, 1, len(before))
    assert {p: s for p, s in rows.items() if p in before} == before
    ok_before = sum(status == "ok" for status in before.values())
    assert sum(c.images for c in poison_model.read_calls(calls)) == 40 - ok_before, (
        "the resume computed rows that were already committed")


def test_an_s3_inventory_report_runs_each_objects_latest_version(s3, sample_dir, tmp_path):
    """The report's manifest.json, its gzipped CSV data files (form-encoded keys, every
    version) and the images are all objects; the run reads each object once."""
    keys = sorted(f"in/{p.relative_to(sample_dir)}" for p in sample_dir.rglob("*.*"))[:6]
    versions = [(k, True, False, 1) for k in keys] + [
        (keys[0], False, False, 1), ("in/gone.jpg", True, True, None)]
    manifest = write_inventory(tmp_path, "CSV", versions, bucket=BUCKET, destination=BUCKET)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            key = f"{BUCKET}/{path.relative_to(tmp_path)}"
            with s3.open_output_stream(key, compression=None) as f:  # as stored: gzip
                f.write(path.read_bytes())
    report = f"s3://{BUCKET}/{manifest.relative_to(tmp_path)}"
    summary = pipeline.run(report, f"s3://{BUCKET}/inventory-out", input_list=True)
    assert (summary.rows_ok, summary.rows_error) == (6, 0)
    assert summary.skipped == {"S3 Inventory: not the latest version": 1,
                               "S3 Inventory: delete marker": 1}
    rows = pq.read_table(f"{BUCKET}/inventory-out", filesystem=s3).to_pylist()
    assert sorted(r["path"] for r in rows) == [f"s3://{BUCKET}/{k}" for k in keys]


def claims(s3, prefix: str) -> list[str]:
    return sorted(i.base_name for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}"))
                  if i.base_name.startswith("_run-"))


@pytest.fixture
def quick_claims(monkeypatch):
    """Claims renewed every second and lapsing after three, so the tests wait seconds."""
    from pipeline import output_lock

    monkeypatch.setattr(output_lock, "RENEW", 1.0)
    monkeypatch.setattr(output_lock, "LAPSE", 3.0)
    monkeypatch.setattr(output_lock, "POLL", 0.2)


def test_a_second_run_into_an_s3_output_in_use_is_refused(s3, quick_claims):
    """An object store has no flock: a live run's claim, renewed while the second run
    watches, refuses the second run before it lists its inputs or writes anything."""
    from pipeline.write import OutputDir, OutputError

    out = f"s3://{BUCKET}/busy"
    first = OutputDir(out).lock()  # what a run holds while it runs
    try:
        started = time.monotonic()
        with pytest.raises(OutputError, match=rf"Output '{out}' is being written by another "
                           rf"run \(host {socket.gethostname()}, pid {os.getpid()}, started "):
            pipeline.run(f"s3://{BUCKET}/in", out)
        assert time.monotonic() - started < 10
        assert claims(s3, "busy") == [first.name]  # the refused run left nothing
    finally:
        first.release()
    assert claims(s3, "busy") == []
    summary = pipeline.run(f"s3://{BUCKET}/in", out)
    assert summary.rows_ok + summary.rows_error == 41
    assert claims(s3, "busy") == []  # released at the end


def test_a_dead_runs_claim_lapses(s3, quick_claims, caplog):
    """A driver killed on another machine leaves its claim: the next run waits for it to
    lapse (not renewed for LAPSE seconds), removes it and runs."""
    dead = f"{BUCKET}/lapsed/_run-0123.json"
    with s3.open_output_stream(dead) as f:
        f.write(b'{"host": "a-pod-that-is-gone", "pid": 7, "started": "2026-11-27T00:00:00"}')
    started = time.monotonic()
    summary = pipeline.run(f"s3://{BUCKET}/in/[0-4]/*", f"s3://{BUCKET}/lapsed")
    assert summary.rows_ok > 0 and time.monotonic() - started >= 1.5
    assert claims(s3, "lapsed") == []
    assert "holds another run's claim (_run-0123.json, host a-pod-that-is-gone, pid 7" in (
        caplog.text)


def test_the_claim_of_a_dead_process_on_this_machine_is_removed_at_once(s3, quick_claims):
    """A rerun after a driver was killed on this machine need not wait for the lapse."""
    import subprocess

    from pipeline import machine
    from pipeline.write import OutputDir

    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    with s3.open_output_stream(f"{BUCKET}/rerun/_run-0456.json") as f:
        f.write(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                            "pids": machine.identity("pid"),
                            "started": "2026-11-27T00:00:00"}).encode())
    started = time.monotonic()
    lock = OutputDir(f"s3://{BUCKET}/rerun").lock()
    try:
        assert time.monotonic() - started < 1.0  # well under LAPSE (3 s)
        assert claims(s3, "rerun") == [lock.name]
    finally:
        lock.release()


def test_a_run_whose_claim_was_taken_stops_instead_of_writing_beside_another(s3, quick_claims):
    """A driver that could not renew its claim for LAPSE seconds (a laptop suspended, a store
    cut off) may find another run took the output for a dead run's: it stops (exit 1), instead
    of writing rows beside the other run's."""
    import threading

    from pipeline.write import OutputDir, WriteFailure

    lock = OutputDir(f"s3://{BUCKET}/taken").lock()
    try:  # missed renewals, then another run's claim: lost
        with s3.open_output_stream(f"{BUCKET}/taken/_run-another.json") as f:
            f.write(b'{"host": "another", "pid": 1}')

        def slept() -> str | None:
            lock._renewed = time.time() - 10  # as if this machine had slept for 10 s
            return lock.lost()

        _until(slept, "the claim is lost")
        assert lock.lost().startswith("its claim was not renewed for 10 s")
        assert lock.lost().endswith("another run has claimed the output since "
                                    "(_run-another.json)")
    finally:
        lock.release()

    # A run whose claim another run deleted stops at its next block (its first: starting an
    # actor alone takes longer than a renewal).
    out = f"s3://{BUCKET}/taken-mid-run"
    deleted = threading.Event()

    def take_it() -> None:
        def mine():
            try:
                return claims(s3, "taken-mid-run")
            except FileNotFoundError:  # not yet made
                return []
        _until(mine, "the run's claim")
        s3.delete_file(f"{BUCKET}/taken-mid-run/{mine()[0]}")  # as a run that took it for dead
        deleted.set()

    thief = threading.Thread(target=take_it, daemon=True)
    thief.start()
    with pytest.raises(WriteFailure, match=(
            rf"this run no longer holds its output '{out}': its claim _run-\w+\.json was deleted, "
            r"as another run does with a claim not renewed for 3 s\. Was this driver suspended")):
        pipeline.run(f"s3://{BUCKET}/in", out, progress=False)
    assert deleted.is_set()
    assert claims(s3, "taken-mid-run") == []  # never written again


def _until(condition, what: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.05)


def test_two_runs_starting_together_never_both_hold_an_s3_output(s3, quick_claims):
    """Each writes its claim, then watches the other's being renewed: one or both are
    refused, never neither."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.write import OutputDir, OutputError

    def take(_):
        try:
            return OutputDir(f"s3://{BUCKET}/race").lock()
        except OutputError:
            return None

    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            held = [lock for lock in pool.map(take, range(2)) if lock is not None]
        assert len(held) <= 1
        for lock in held:
            lock.release()
        assert claims(s3, "race") == []


def test_missing_bucket_prefix_is_one_clear_error(s3, tmp_path):
    from pipeline.listing import InputError

    with pytest.raises(InputError, match=f"s3://{BUCKET}/nothing-here"):
        pipeline.run(f"s3://{BUCKET}/nothing-here", str(tmp_path / "out"))


def test_model_weights_at_a_uri_are_copied_once_per_machine(s3, sample_dir, tmp_path):
    """--model s3://... (a snapshot folder): the driver and the actor each load it from this
    machine's cache, filled once; a changed object is fetched again; a single object is
    copied as a file; a URI with nothing under it is one clear error."""
    import os
    import shutil
    from pathlib import Path

    from pipeline import model_files
    from pipeline.model import ModelError
    from pipeline.models import clip

    tiny = Path(__file__).parent / "reference" / "clip_tiny"
    for f in sorted(tiny.iterdir()):
        with s3.open_output_stream(f"{BUCKET}/models/clip_tiny/{f.name}") as out:
            out.write(f.read_bytes())
    uri = f"s3://{BUCKET}/models/clip_tiny"
    copies = []
    try:
        summary = pipeline.run(str(sample_dir), str(tmp_path / "out"),
                               model_fn="pipeline.models.clip:build", model=uri)
        assert summary.rows_ok == 40
        assert {r["model"] for r in pq.read_table(tmp_path / "out").to_pylist()} == {
            clip.build(str(tiny)).fingerprint}
        local = Path(model_files.local_path(uri))
        copies.append(local.parent)
        assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
        assert (local / "model.safetensors").read_bytes() == (
            tiny / "model.safetensors").read_bytes()
        fetched = os.stat(local / "model.safetensors").st_mtime_ns
        assert Path(model_files.local_path(uri)) == local  # the run's copy, not a new one
        assert Path(model_files.local_path(f"{uri}/")) == local  # a trailing slash: the same
        assert os.stat(local / "model.safetensors").st_mtime_ns == fetched

        with s3.open_output_stream(f"{BUCKET}/models/clip_tiny/config.json") as out:
            out.write((tiny / "config.json").read_bytes().replace(b'"gelu"', b'"quick_gelu"'))
        changed = Path(model_files.local_path(uri))
        copies.append(changed.parent)
        assert changed != local and b"quick_gelu" in (changed / "config.json").read_bytes()

        single = Path(model_files.local_path(f"{uri}/model.safetensors"))
        copies.append(single.parent)
        assert single.is_file() and single.name == "model.safetensors"
        with pytest.raises(ModelError, match="No model weights at 's3://"):
            pipeline.load_model(f"s3://{BUCKET}/models/nothing", "pipeline.models.clip:build")
    finally:
        for copy in copies:
            shutil.rmtree(copy, ignore_errors=True)


def test_model_weights_replaced_during_a_run_stop_it(s3, sample_dir, tmp_path, monkeypatch):
    """The driver fingerprints the weights it loaded from a URI; an actor that starts later (a
    new node, a restart) must load that same version. Here an object is replaced just after
    the driver loaded the model: the actor refuses the new version before downloading it, and
    the run stops with one line instead of writing rows of other weights under the first
    fingerprint."""
    import shutil
    from pathlib import Path

    from pipeline import model_files, runner
    from pipeline.model import ModelError

    tiny = Path(__file__).parent / "reference" / "clip_tiny"
    for f in sorted(tiny.iterdir()):
        with s3.open_output_stream(f"{BUCKET}/models/replaced/{f.name}") as out:
            out.write(f.read_bytes())
    uri, loaded = f"s3://{BUCKET}/models/replaced", []

    def load_then_replace(*args, **kwargs):
        loaded.append(model := load_model(*args, **kwargs))
        with s3.open_output_stream(f"{BUCKET}/models/replaced/config.json") as out:
            out.write((tiny / "config.json").read_bytes() + b"\n")  # a new upload
        return model

    load_model = runner.load_model
    monkeypatch.setattr(runner, "load_model", load_then_replace)
    try:
        with pytest.raises(ModelError, match=f"The model weights at '{uri}' changed after this "
                                             "run started"):
            pipeline.run(str(sample_dir), str(tmp_path / "out"),
                         model_fn="pipeline.models.clip:build", model=uri)
        assert not list((tmp_path / "out").glob("part-*"))
        # The actor refused before fetching: the cache holds the driver's copy only.
        assert [p.name for p in model_files.CACHE.glob(f"{loaded[0].weights}*")] == [
            loaded[0].weights]
    finally:
        for model in loaded:
            shutil.rmtree(model_files.CACHE / model.weights, ignore_errors=True)


def test_a_killed_downloads_folder_is_removed_by_the_next_download(s3, tmp_path):
    """A SIGKILLed download leaves its temporary folder (no finally runs); downloads happen
    one at a time under the cache's lock, so the next one removes it."""
    from pathlib import Path

    from pipeline import model_files

    with s3.open_output_stream(f"{BUCKET}/models/one.bin") as out:
        out.write(b"weights")
    cache = tmp_path / "cache"
    left = cache / "0123abcd.partial-x1y2"
    left.mkdir(parents=True)
    (left / "one.bin").write_bytes(b"half")
    copy = model_files.local_path(f"s3://{BUCKET}/models/one.bin", cache=cache)
    assert Path(copy).read_bytes() == b"weights"
    assert not list(cache.glob("*.partial-*"))


def test_a_new_version_of_a_model_replaces_the_copies_of_the_old(s3, tmp_path):
    """A model retrained and uploaded again under one URI: each node's cache keeps the new
    version's copy only (no run can load an old one again), and leaves other URIs' copies
    and folders it did not make alone."""
    from pathlib import Path

    from pipeline import model_files

    cache = tmp_path / "cache"
    uri, other = f"s3://{BUCKET}/models/nightly.bin", f"s3://{BUCKET}/models/other.bin"
    with s3.open_output_stream(f"{BUCKET}/models/other.bin") as out:
        out.write(b"other")
    kept = Path(model_files.local_path(other, cache=cache))
    (cache / "by-hand").mkdir()
    copies = []
    for day in (b"monday", b"tuesday"):
        with s3.open_output_stream(f"{BUCKET}/models/nightly.bin") as out:
            out.write(day)
        copies.append(Path(model_files.local_path(uri, cache=cache)))
        assert copies[-1].read_bytes() == day  # another size: another version
    assert copies[0].parent != copies[1].parent and not copies[0].parent.exists()
    assert kept.read_bytes() == b"other" and (cache / "by-hand").is_dir()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [".lock", "by-hand", kept.parent.name, copies[1].parent.name])
