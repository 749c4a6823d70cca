"""The model failing on some images, an inference actor killed, a node lost: every input still
gets exactly one row.

Faults are injected the way they happen: the model (``tests/poison_model.py``) fails inside its
compiled function, actors are SIGKILLed by pid (found through Ray's state API), a node of a
3-node local cluster is removed. These tests start their own Ray (the state API needs the
dashboard; the node test needs several nodes) and shut it down when done.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import poison_model
import pyarrow.parquet as pq
import pytest
from conftest import label_of
from PIL import Image

import pipeline
from pipeline.digits import write_samples

# In the name of the actor class Ray Data makes of ours: "MapWorker(MapBatches(Predictor))",
# or "MapWorker(MapBatches(_decode_task)->MapBatches(Predictor))" when it fuses decode in.
PREDICTOR = "MapBatches(Predictor)"
_ray: dict = {}  # the Ray this module started: {"dashboard": url}


@pytest.fixture
def own_ray():
    """A 2-CPU loopback Ray with its dashboard, started once for the tests that share it; its
    workers import tests/ modules (PYTHONPATH is inherited from this process)."""
    import ray

    if not _ray or not ray.is_initialized():
        ray.shutdown()
        _ray["pythonpath"] = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = poison_model.worker_env()["PYTHONPATH"]
        ctx = ray.init(
            address="local",  # never join another Ray found on this machine
            num_cpus=2,
            object_store_memory=200 * 1024**2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
        _ray["dashboard"] = f"http://{ctx.dashboard_url}"
    yield _ray["dashboard"]


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


def alive_predictor_pid(dashboard: str, timeout: float = 60) -> int:
    """The pid of the one live inference actor, from Ray's state API (which can lag a restart
    by a moment: it is asked again until it reports one)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout
    while True:
        alive = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], timeout=30)
        alive = [a for a in alive if PREDICTOR in a.class_name]
        if len(alive) == 1 and alive[0].pid:
            return alive[0].pid
        assert time.monotonic() < deadline, f"no single live inference actor: {alive}"
        time.sleep(0.1)


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


def test_actor_killed_mid_run_is_replaced(own_ray, tmp_path):
    """SIGKILL the inference actor mid-call, then its replacement too, soon after it starts."""
    src, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls"
    write_inputs(src, 160)
    options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.1)

    def kill_predictor_twice():
        killed = []
        for wait_for in (4, 2):  # calls by the actor about to be killed
            done = len(poison_model.read_calls(calls))
            deadline = time.monotonic() + 120
            while True:
                recent = poison_model.read_calls(calls)[done:]
                if sum(c.pid not in killed for c in recent) >= wait_for:
                    break
                assert time.monotonic() < deadline, "the model stopped being called"
                time.sleep(0.05)
            pid = alive_predictor_pid(own_ray)
            os.kill(pid, signal.SIGKILL)  # mid-call: each call sleeps inside the model
            killed.append(pid)
        return killed, len(poison_model.read_calls(calls))

    killer = Injector(kill_predictor_twice)
    killer.start()
    summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                           batch_size=8, actors=1, rows_per_file=32, progress=False)
    killed, calls_before = killer.outcome()

    rows = check_exactly_once(out, src)
    assert all(r["status"] == "ok" for r in rows) and summary.rows_ok == 160
    made = poison_model.read_calls(calls)
    assert len({c.pid for c in made}) == 3  # the first actor and two replacements
    after = [c.images for c in made[calls_before:] if c.pid not in killed]
    assert sum(after) >= 160 - sum(c.images for c in made[:calls_before]), (
        "the last actor did not do the rest of the work")


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
    actor is busy is removed mid-run."""
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
        options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.1)

        def remove_busy_node():
            busy = wait_for_calls(calls, 4)[-1]  # the node whose actor made the latest call
            (node,) = [w for w in workers if w.node_id == busy.node]
            assert busy.pid in kill_node(cluster, node)
            return busy.node, len(poison_model.read_calls(calls))

        remover = Injector(remove_busy_node)
        remover.start()
        summary = pipeline.run(str(src), str(out), model_fn="poison_model:build", model=options,
                               batch_size=8, actors=2, rows_per_file=32, progress=False)
        lost_node, calls_before = remover.outcome()

        rows = check_exactly_once(out, src)
        assert all(r["status"] == "ok" for r in rows) and summary.rows_ok == 240
        made = poison_model.read_calls(calls)
        assert not [c for c in made[calls_before:] if c.node == lost_node]  # it is gone
        assert sum(c.images for c in made[calls_before:]) > 0, "lost after the work was done"
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
