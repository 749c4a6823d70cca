"""The model failing on some images, an inference actor killed, a node lost: every input still
gets exactly one row.

Faults are injected the way they happen: the model (``tests/poison_model.py``) fails inside its
compiled function, actors are SIGKILLed by pid in the middle of a model call (the model's call
log says which process is calling it), a node of a 3-node local cluster is removed. The call
log also names the images of each call, so a test can check that work cut short was redone.
These tests start their own Ray (the node test needs several nodes) and shut it down when done.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import poison_decoder
import poison_model
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import finishes
from PIL import Image

import pipeline
from pipeline.config import RunConfig
from pipeline.digits import write_samples
from pipeline.model import load_model
from pipeline.progress import Observer
from pipeline.runner import run_config

_ray: dict = {}  # the Ray this module started: {"address": GCS address}


@pytest.fixture
def own_ray():
    """A 2-CPU loopback Ray, started once for the tests that share it; its workers import
    tests/ modules (PYTHONPATH is inherited from this process), and their Pillow crashes on
    :data:`poison_decoder.MARK`."""
    import ray

    if not _ray or not ray.is_initialized():
        ray.shutdown()
        _ray["pythonpath"] = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = poison_model.worker_env()["PYTHONPATH"]
        ctx = ray.init(
            address="local",  # never join another Ray found on this machine
            num_cpus=2,
            object_store_memory=200 * 1024**2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
            runtime_env={"worker_process_setup_hook": poison_decoder.install},
        )
        _ray["address"] = ctx.address_info["gcs_address"]
    yield _ray["address"]


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray_after_module():
    yield
    import ray

    ray.shutdown()
    if _ray.get("pythonpath") is not None:
        os.environ["PYTHONPATH"] = _ray["pythonpath"]
    elif "pythonpath" in _ray:
        os.environ.pop("PYTHONPATH", None)
    _ray.clear()


def write_inputs(root: Path, count: int, poison: int = 0) -> list[Path]:
    """``count`` digit images (DIR/<label>/x.png|jpg) and ``poison`` solid-gray marker images."""
    write_samples(root, count, seed=3)
    marked = []
    for i in range(poison):
        path = root / "poison" / f"marked_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("L", (20 + 7 * i, 30), poison_model.DEFAULTS["marker"]).save(path)
        marked.append(path)
    return marked


def check_exactly_once(out: Path, src: Path) -> list[dict]:
    rows = pq.read_table(out).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert sorted(paths) == sorted(str(p) for p in src.rglob("*.*")), "rows lost or invented"
    return rows


def wait_for_calls(calls: Path, at_least: int, timeout: float = 180) -> list[poison_model.Call]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = poison_model.read_calls(calls)
        if len(seen) >= at_least:
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"the model made fewer than {at_least} calls in {timeout}s")


class Injector(threading.Thread):
    """Runs ``inject`` in the background while the pipeline runs in the test's thread; keeps
    what it returned or raised for the test to check."""

    def __init__(self, inject):
        super().__init__(daemon=True)
        self.inject, self.result, self.error = inject, None, None

    def run(self):
        try:
            self.result = self.inject()
        except BaseException as e:  # noqa: BLE001 - handed to the test, which re-raises it
            self.error = e

    def outcome(self):
        self.join(timeout=60)
        if self.error is not None:
            raise self.error
        return self.result


BATCH = 32
POISON_AT = (5, 22)  # rows of the one batch: in different halves, quarters and eighths


def write_mixed_batch(root: Path) -> tuple[list[Path], list[Path]]:
    """One batch of BATCH images in one directory, listed in name order: digits, with solid
    gray marker images at rows POISON_AT among them. Returns (healthy, poison) paths."""
    digits = write_samples(root.parent / "digits", BATCH - len(POISON_AT), seed=3)
    root.mkdir()
    healthy, poison = [], []
    for row in range(BATCH):
        if row in POISON_AT:
            path = root / f"{row:02d}_poison.png"
            size = (20 + 7 * len(poison), 30)
            Image.new("L", size, poison_model.DEFAULTS["marker"]).save(path)
            poison.append(path)
        else:
            digit = digits[len(healthy)]
            path = root / f"{row:02d}_label{digit.parent.name}{digit.suffix}"
            path.write_bytes(digit.read_bytes())
            healthy.append(path)
    return healthy, poison


def bisection(lo: int, hi: int, bad: set[int]) -> list[tuple[int, int]]:
    """The row ranges a model call covers when rows [lo, hi) are run and every failing range
    is halved (each half padded to the compiled shape) down to single rows."""
    if hi - lo == 1 or not bad & set(range(lo, hi)):
        return [(lo, hi)]
    mid = (lo + hi) // 2
    return [(lo, hi), *bisection(lo, mid, bad), *bisection(mid, hi, bad)]


@pytest.mark.parametrize("mode, message", [
    ("raise", r"model failed on this image: .*poison image in batch"),
    ("nan", r"model output is NaN or Inf for this image"),
], ids=["raises", "nan"])
def test_poison_images_are_isolated_by_bisection(own_ray, tmp_path, mode, message):
    """Two poison images share one batch of 32 with 30 healthy ones (rows 5 and 22).

    The model calls are identified by the images they held (digests in the call log), so the
    test sees the exact halves: for ``raise`` the calls are the 19 ranges of halving 32 rows
    down to the two culprits, no more, no other. That rules out failing the whole batch
    (30 healthy rows would be errors), retrying a failed batch one image at a time (33 calls
    of 32 and 1), and a split that is not into halves of the batch. For ``nan`` a NaN row
    needs no retry: one call, and only the two NaN rows are errors (rules out failing the
    whole batch on any NaN, and re-running it).

    Only calls holding real images are counted (padding rows are zeros, which the call log
    does not count): a synthetic canary batch run after a failure is no call on the inputs.
    A canary made of real input images would have to be told apart here."""
    src, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls"
    healthy, marked = write_mixed_batch(src)
    options = poison_model.write_options(tmp_path / "model.json", mode=mode, calls=str(calls))
    summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                           batch_size=BATCH, actors=1, progress=False)

    rows = check_exactly_once(out, src)
    bad = {r["path"]: r for r in rows if r["status"] == "error"}
    assert sorted(bad) == sorted(map(str, marked)), "only the poison images are errors"
    for r in bad.values():
        assert re.search(message, r["error"]), r["error"]
        assert r["label"] is None
    right = sum(r["label_name"] == r["path"].rsplit("label", 1)[-1][0] for r in rows
                if r["status"] == "ok")
    assert right >= len(healthy) - 2, f"{right}/{len(healthy)}: neighbours of poison broken"
    assert (summary.rows_ok, summary.rows_error) == (len(healthy), len(marked))

    made = [c.ids for c in poison_model.read_calls(calls) if c.images > 0]
    (batch,) = [ids for ids in made if len(ids) == BATCH]  # the first call: the whole batch
    poison_id = batch[POISON_AT[0]]
    assert [i for i, d in enumerate(batch) if d == poison_id] == list(POISON_AT), (
        "the poison images do not sit among healthy ones in one batch")
    if mode == "raise":
        expected = [batch[lo:hi] for lo, hi in bisection(0, BATCH, set(POISON_AT))]
        assert len(expected) == 19
    else:
        expected = [batch]
    assert sorted(made) == sorted(expected), (
        f"model calls (images per call) {[len(ids) for ids in made]}, expected "
        f"{[len(ids) for ids in expected]}")


def test_image_that_kills_the_process_becomes_an_error_row(own_ray, tmp_path):
    """No exception to catch: the process exits on the marked image (as on a segfault or an
    out-of-memory kill). Ray would restart the actor and retry the batch for ever; the crash
    guard finds the image across restarts instead. The marked image sorts last, so it sits
    in the last of many batches of a block (the block is retried whole after each death)."""
    src, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls"
    (marked,) = write_inputs(src, 150, poison=1)
    options = poison_model.write_options(tmp_path / "model.json", mode="exit", calls=str(calls))
    summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                           batch_size=4, actors=1, progress=False)

    rows = check_exactly_once(out, src)
    (bad,) = [r for r in rows if r["status"] == "error"]
    assert bad["path"] == str(marked)
    assert bad["error"] == ("the inference process died while predicting this image (2 times): "
                            "the model crashes on it")
    assert (summary.rows_ok, summary.rows_error) == (150, 1)
    assert len({c.pid for c in poison_model.read_calls(calls)}) == 5  # 2k + 2 restarts, k = 1


def test_files_that_kill_or_hang_the_decoder_become_error_rows(own_ray, tmp_path):
    """A decode task's process dies (SIGSEGV in the decoder) on one file in the middle of the
    listing, its decoder never returns on another, and reading a third never returns (a stuck
    mount). Ray Data retries a dead task for ever (and a hung one never ends); the decode
    guard's watchdog turns a hang into a death, and the guard finds each file across the
    retries: each becomes one error row, and every other file one ok row. The user is told so
    in the tool's words."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_inputs(src, 150)
    marked = src / "5" / "zz_crash.png"
    marked.write_bytes(poison_decoder.MARK + b" and the rest of a malformed file")
    hangs = src / "8" / "a_hang.jpg"
    hangs.write_bytes(poison_decoder.HANG + b" and more")
    stuck = src / "2" / f"{poison_decoder.HANG.decode()}.png"  # a good image whose read
    Image.new("L", (32, 32)).save(stuck)  # never returns, as on a stuck mount

    events: list[str] = []

    class Heard(Observer):
        def event(self, message: str) -> None:
            events.append(message)

    cfg = RunConfig(input=str(src), output=str(out), progress=False, decode_timeout=1.5)
    summary = finishes(180, lambda: run_config(cfg, Heard()))  # the old failure is a hang

    rows = check_exactly_once(out, src)
    bad = {r["path"]: r for r in rows if r["status"] == "error"}
    assert bad.keys() == {str(marked), str(hangs), str(stuck)}
    assert {r["error_kind"] for r in bad.values()} == {"decode_crash"}
    assert bad[str(marked)]["error"] == (
        "DecodeCrash: the decode process died while decoding this file (2 times): it crashes "
        "the image decoder, or needs more memory than the node has")
    assert bad[str(hangs)]["error"] == (
        "DecodeCrash: decoding this file took over 1.5 s (2 times; --decode-timeout): the "
        "image decoder hangs on it")
    assert bad[str(stuck)]["error"] == (
        "DecodeCrash: reading this file took over 1.5 s (2 times; --decode-timeout): its "
        "storage hangs on it (a stuck network or FUSE mount?)")
    assert (summary.rows_ok, summary.rows_error) == (150, 3)
    assert sorted(events) == sorted(
        f"reading or decoding {path} killed or hung the decoding process twice: it is an "
        "error row (decode_crash), and Ray decoded the other inputs of its task again"
        for path in (marked, hangs, stuck))


def test_a_file_that_hung_twice_is_not_read_again_when_its_task_starts_over(own_ray, tmp_path):
    """A decode task's retry starts its slice over: after a later death, the files before
    that death's range are decoded again without care. A file that already hung its read
    twice must not be read a third time there (it would hang again): its row is the guard's."""
    import itertools

    from pipeline.crash_guard import DECODE_HUNG, READ_HUNG, DecodeGuard, _put
    from pipeline.source import Source

    write_inputs(tmp_path, 8)
    paths = sorted(str(p) for p in tmp_path.rglob("*.*"))
    stuck, looped = paths[1], paths[2]
    os.remove(stuck)  # were it read, its row would say it is gone
    key = f"test-{uuid.uuid4().hex}/decode/0"
    # The record of a task whose reading of one file hung twice, then decoding another, and
    # which has since died in its second block (rows 4..7).
    _put(key, {"from": paths[4], "to": paths[7], "row": None,
               "strikes": {stuck: 2, looped: 2}, "hung": {stuck: "reading", looped: "decoding"}})
    guard = DecodeGuard(key, timeout=60)
    try:
        listing = pa.table({"path": paths, "size": pa.array([None] * 8, pa.int64())})
        blocks = list(Source().decode(listing, np.arange(8), set(), load_model().spec,
                                      10**8, 4, guard))
    finally:
        guard.close()
    errors = dict(zip(itertools.chain(*(b["path"] for b in blocks)),
                      itertools.chain(*(b["error"] for b in blocks))))
    assert errors.pop(stuck) == "DecodeCrash: " + READ_HUNG.format(limit=60, n=2)
    assert errors.pop(looped) == "DecodeCrash: " + DECODE_HUNG.format(limit=60, n=2)
    assert set(errors.values()) == {""}


def test_reads_that_hang_on_two_files_of_a_task_stop_the_run(own_ray):
    """One file whose read hangs is that file's error row; reads hanging on a second file of
    the same slice are its storage not answering (a dead mount): the next retry stops the
    run with one line, instead of writing off every file after 10 minutes each."""
    from pipeline.crash_guard import DecodeGuard, StorageHung, _put
    from pipeline.runner import our_error

    key = f"test-{uuid.uuid4().hex}/decode/0"
    _put(key, {"from": "/nfs/a.jpg", "to": "/nfs/z.jpg", "row": "/nfs/b.jpg",
               "strikes": {"/nfs/a.jpg": 2, "/nfs/b.jpg": 0},
               "hung": {"/nfs/a.jpg": "reading", "/nfs/x.jpg": "decoding"}})
    DecodeGuard(key, timeout=300).close()  # one stuck read (and a hung decoder): go on
    _put(key, {"from": "/nfs/a.jpg", "to": "/nfs/z.jpg", "row": "/nfs/b.jpg",
               "strikes": {"/nfs/a.jpg": 2}, "hung": {"/nfs/a.jpg": "reading",
                                                      "/nfs/b.jpg": "reading"}})
    with pytest.raises(StorageHung) as stopped:
        DecodeGuard(key, timeout=300)
    line = ("reading 2 input files hung for over 300 s each (--decode-timeout) in one decode "
            "task (/nfs/a.jpg, /nfs/b.jpg): their storage is not answering (a stuck NFS or FUSE "
            "mount?), so the run stops. Rows already written are kept: once it answers, run "
            "again with --resume")
    assert str(stopped.value) == line
    # Raised in a Ray task, it reaches the user as that one line (exit 1 from the CLI).
    rebuilt = our_error(RuntimeError(f"ray.exceptions.RayTaskError(StorageHung): Traceback ...\n"
                                     f"pipeline.crash_guard.StorageHung: {line}"))
    assert isinstance(rebuilt, StorageHung) and str(rebuilt) == line


def test_a_shard_that_kills_its_reader_keeps_the_rows_before_the_crash(own_ray, tmp_path):
    """The tar reader dies (SIGSEGV) at one member of a shard, as a reader does on the part of
    a shard that crashes it or the out-of-memory killer on a member that inflates too far.
    Ray Data retries a dead read task for ever, so the run hung. Now the guard finds where in
    the shard the process dies: the rows before that point are predicted, one error row (path:
    the shard) stands for the rest, and the other shard is untouched. A third shard's read
    never returns (a stuck mount): it is one error row, and the run ends."""
    write_inputs(tmp_path / "images", 40)
    images = sorted((tmp_path / "images").rglob("*.*"))
    src = tmp_path / "shards"
    src.mkdir()
    for name, crash_at in (("a.tar", 30), ("b.tar", None)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, image in enumerate(images):
                key = f"{poison_decoder.MARK.decode()}-{i:03d}" if i == crash_at else f"{i:03d}"
                info = tarfile.TarInfo(f"{key}{image.suffix}")
                info.size = image.stat().st_size
                tar.addfile(info, io.BytesIO(image.read_bytes()))
        (src / name).write_bytes(buf.getvalue())
    stuck = src / f"{poison_decoder.HANG.decode()}.tar"  # a good shard whose read never returns
    stuck.write_bytes((src / "b.tar").read_bytes())
    events: list[str] = []

    class Heard(Observer):
        def event(self, message: str) -> None:
            events.append(message)

    cfg = RunConfig(input=str(src), output=str(tmp_path / "out"), input_format="tar",
                    progress=False, rows_per_file=8, decode_timeout=1.5)
    summary = finishes(180, lambda: run_config(cfg, Heard()))  # the old failure is a hang

    rows = pq.read_table(tmp_path / "out").to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 30 + 1 + 40 + 1
    bad = sorted((r for r in rows if r["status"] == "error"), key=lambda r: r["path"])
    assert [(r["path"], r["error_kind"]) for r in bad] == [
        (str(stuck), "decode_crash"), (f"{src}/a.tar", "decode_crash")]
    assert bad.pop(0)["error"] == (
        "DecodeCrash: reading this file took over 1.5 s (2 times; --decode-timeout): its "
        "storage hangs on it (a stuck network or FUSE mount?)")
    assert bad[0]["error"] == (
        "DecodeCrash: the decode process died reading this shard after 30 of its rows (2 "
        "times): its reader crashes on what follows, or it inflates to more memory than the "
        "node has; the rest of the shard is not read")
    assert sorted(p for p in paths if p.startswith(f"{src}/a.tar/")) == [
        f"{src}/a.tar/{i:03d}{images[i].suffix}" for i in range(30)]
    assert (summary.rows_ok, summary.rows_error) == (70, 2)
    assert sorted(events) == sorted(
        f"reading or decoding {shard} killed or hung the decoding process twice: it is an "
        "error row (decode_crash), and Ray decoded the other inputs of its task again"
        for shard in (f"{src}/a.tar", stuck))


def wait_for_new_calls(calls: Path, after: int, count: int, ended: threading.Event, what: str,
                       timeout: float = 180) -> list[poison_model.Call]:
    """Wait until the call log holds ``count`` calls past its first ``after``; returns them.
    Fails clearly when the run ends first."""
    deadline = time.monotonic() + timeout
    while True:
        recent = poison_model.read_calls(calls)[after:]
        if len(recent) >= count:
            return recent
        assert not ended.is_set(), (
            f"the run ended before {what}: the kill would land after the work was done; give "
            "the test more images or a longer model delay")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def redone(calls: list[poison_model.Call], killed: poison_model.Call, after: int) -> bool:
    """Whether every image of ``killed`` (a call cut short) was computed again, by another
    process, in the calls from ``after`` on."""
    again = {i for c in calls[after:] if c.pid != killed.pid for i in c.ids}
    return set(killed.ids) <= again


def test_actor_killed_mid_run_is_replaced(own_ray, tmp_path):
    """SIGKILL the inference actor in the middle of a model call, then its replacement too.

    Each model call sleeps 0.3 s, so a kill sent as soon as a call is logged lands inside it:
    that call's images are in flight, and must be computed again by the next actor. There are
    20 calls of work and the kills come after 4 and 4 + 2 calls; if a kill still came after
    the run had ended (a much slower machine), the test says so instead of passing.
    Rules out: a pool that does not restart the actor (rows lost), one that drops the killed
    actor's in-flight batch (its images never computed again), and a retry that duplicates
    rows."""
    src, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls"
    write_inputs(src, 160)
    options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.3)
    ended = threading.Event()

    def kill_predictor_twice():
        killed = []  # (the call cut short, its index in the call log)
        for n, wait_for in enumerate((4, 2), 1):  # calls by the actor about to be killed
            after = len(poison_model.read_calls(calls))
            recent = wait_for_new_calls(calls, after, wait_for, ended, f"kill {n}")
            victim = recent[-1]  # the call running now, sleeping inside the model
            try:
                os.kill(victim.pid, signal.SIGKILL)
            except ProcessLookupError:
                raise AssertionError(f"kill {n}: actor {victim.pid} had already exited") from None
            killed.append((victim, after + len(recent) - 1))
        return killed

    killer = Injector(kill_predictor_twice)
    killer.start()
    try:
        summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                               batch_size=8, actors=1, rows_per_file=32, progress=False)
    finally:
        ended.set()
    killed = killer.outcome()

    rows = check_exactly_once(out, src)
    assert all(r["status"] == "ok" for r in rows) and summary.rows_ok == 160
    made = poison_model.read_calls(calls)
    pids = list(dict.fromkeys(c.pid for c in made))
    assert len(pids) == 3, f"expected the first actor and two replacements, saw pids {pids}"
    for (victim, index), n in zip(killed, (1, 2)):
        assert victim.pid not in {c.pid for c in made[index + 1:]}, f"kill {n} missed its actor"
        assert redone(made, victim, index + 1), (
            f"kill {n}: the images of the call it cut short were never computed again")


def kill_node(cluster, node) -> list[int]:
    """What a machine failure does: every process of the node dies at once (its raylet and the
    workers and actors it started), then the cluster drops the node. Returns the pids killed.
    (``remove_node`` alone kills the raylet but leaves its workers running for a while.)"""
    victims = descendants(node.all_processes["raylet"][0].process.pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return victims


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


@pytest.mark.slow
def test_node_lost_mid_run(tmp_path, monkeypatch):
    """A 3-node cluster on loopback (head: driver only; two 2-CPU workers); the worker whose
    actor is busy is removed in the middle of a model call (each sleeps 0.3 s).
    Rules out: losing the rows of the lost node's in-flight block, and counting on any call
    after the loss as proof: the images of the call the loss cut short must be computed
    again on the surviving node."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # Cluster() records its address in $RAY_TMPDIR/ray/ray_current_cluster, where any plain
    # ray.init() on this machine would join it: keep that (and its sockets) to ourselves.
    ray_tmp = tempfile.mkdtemp(prefix="bi-crash-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("PYTHONPATH", poison_model.worker_env()["PYTHONPATH"])
    store = 100 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 0, "object_store_memory": store,
        "include_dashboard": False,
        # A dead node is noticed after 5 failed checks a second apart instead of 5 x 3 s.
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5},
    })
    try:
        workers = [
            cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2, object_store_memory=store)
            for _ in range(2)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        src, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls"
        write_inputs(src, 240)
        options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.3)

        def remove_busy_node():
            seen = wait_for_calls(calls, 4)
            busy = seen[-1]  # the call running now, sleeping inside the model on its node
            (node,) = [w for w in workers if w.node_id == busy.node]
            assert busy.pid in kill_node(cluster, node)
            return busy, len(seen)

        remover = Injector(remove_busy_node)
        remover.start()
        summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                               batch_size=8, actors=2, rows_per_file=32, progress=False)
        busy, calls_before = remover.outcome()

        rows = check_exactly_once(out, src)
        assert all(r["status"] == "ok" for r in rows) and summary.rows_ok == 240
        made = poison_model.read_calls(calls)
        assert not [c for c in made[calls_before:] if c.node == busy.node]  # it is gone
        assert made[calls_before:], "the node was lost after the work was done: give the " \
                                    "test more images or a longer model delay"
        assert redone(made, busy, calls_before), (
            "the images the lost node was computing were never computed again")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
