"""A node that does not see the run's local input or output stops the run with one line naming
the node and the fix (``pipeline/visible.py``), instead of writing good images off as "no
longer exists" error rows or failing with a page of Ray's traceback.

The first test uses a real two-node cluster on loopback: a head started with ``ray start``,
and a second node whose ``ray start`` runs in a private mount namespace (``unshare -m``)
with an empty tmpfs over one directory, as a machine without the NFS mount sees it. That
needs root and ``unshare``; it is skipped where they are missing. The checks a node added
later runs for itself (a decode task, an actor) are tested directly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_job_submit import RAY, _free_port, _stop

from pipeline import dataflow, visible
from pipeline.digits import write_samples
from pipeline.infer import Predictor
from pipeline.listing import ListingFile
from pipeline.model import load_model
from pipeline.plan import PlanError
from pipeline.source import Source
from pipeline.visible import Witnesses


def _can_mount_privately(tmp: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "none", str(tmp)],
        capture_output=True, check=False)
    return probe.returncode == 0


def _ray_start(args: list[str], env: dict, log: Path, hide: Path | None = None):
    cmd = [*RAY, "start", "--block", "--node-ip-address=127.0.0.1",
           "--object-store-memory=100000000",
           f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}",
           f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
           *args]
    if hide is not None:  # this node's own view: an empty tmpfs over ``hide``
        script = f"mount -t tmpfs none {hide} && exec \"$@\""
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(GCS address, the directory only the head's machine sees, client env)."""
    tmp = tmp_path_factory.mktemp("nodes")
    hidden = tmp / "hidden"
    hidden.mkdir()
    if not _can_mount_privately(hidden):
        pytest.skip("needs root and unshare to give a node its own view of a directory")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # conftest's 0 (Ray on loopback) also refuses `ray start --address`; every node
           # here is given 127.0.0.1 instead.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    gcs = f"127.0.0.1:{_free_port()}"
    head = _ray_start(["--head", f"--port={gcs.split(':')[1]}", "--num-cpus=1",
                       "--include-dashboard=false", f"--temp-dir={tmp / 'ray'}"],
                      env, tmp / "head.log")
    nodes = [head]
    try:
        _wait_for_nodes(gcs, env, 1, tmp / "head.log")
        nodes.append(_ray_start([f"--address={gcs}", "--num-cpus=2"], env, tmp / "node.log",
                                hide=hidden))
        _wait_for_nodes(gcs, env, 2, tmp / "node.log")
        yield gcs, hidden, {**env, "RAY_ADDRESS": gcs}
    finally:
        for proc in reversed(nodes):
            _stop(proc)


def _wait_for_nodes(gcs: str, env: dict, count: int, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([*RAY, "status", f"--address={gcs}"], env=env,
                                capture_output=True, text=True, check=False)
        if len(re.findall(r"^\s*1 node_", status.stdout, re.MULTILINE)) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray node(s) not up after {timeout} s:\n{log.read_text()}")


@pytest.mark.slow
def test_a_node_that_does_not_see_a_local_path_stops_the_run_before_it_starts(
        two_nodes, tmp_path):
    gcs, hidden, env = two_nodes
    write_samples(hidden / "in", 20, seed=2)  # only the head's machine sees these
    write_samples(tmp_path / "in", 20, seed=2)
    cases = (
        ("input", hidden / "in", tmp_path / "out"),
        ("output", tmp_path / "in", hidden / "out"),
    )
    for what, src, out in cases:
        cli = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", "--input", str(src), "--output",
             str(out), "--address", gcs], env=env, capture_output=True, text=True,
            timeout=300, check=False)
        assert cli.returncode == 2, cli.stderr[-3000:]
        line = cli.stderr.strip().splitlines()[-1]
        named = str(src if what == "input" else out)
        assert re.fullmatch(
            rf"batch-infer: error: node \S+ \(\S+\) does not see the {what}( directory)? "
            rf"'{re.escape(named)}' \(.*\): on a cluster, --{what} must be storage that every "
            r"node mounts at the same path \(NFS, EFS, a shared volume\), or an s3:// URI",
            line), line
        assert not out.exists() or not list(out.glob("part-*"))  # stopped before any work


def test_a_decode_task_that_does_not_see_the_input_says_so(tmp_path, monkeypatch):
    """A node that joined after the run started checks itself at its first missing input:
    all of the driver's sample gone is an input it does not see; one file gone is a file
    that was removed, and its error row."""
    write_samples(tmp_path / "in", 6, seed=2)
    paths = sorted(str(p) for p in (tmp_path / "in").rglob("*.*"))
    listing = ListingFile.write(str(tmp_path / "out"), ((p, None) for p in paths))
    spec = load_model().spec
    table = listing.read(0, len(paths))
    witnesses = Witnesses.of(str(tmp_path / "in"), str(tmp_path / "out"), listing)
    assert witnesses.inputs == (paths[0], paths[3], paths[5])
    os.remove(paths[3])  # removed after listing: an error row, the run goes on
    blocks = list(Source().decode(table, np.arange(6), set(), spec, 10**8, 4, None, witnesses))
    errors = [e for b in blocks for e in b["error"] if e]
    assert len(errors) == 1 and "no longer exists" in errors[0]
    for path in paths:  # now the whole input is gone, as on a node without the mount
        Path(path).unlink(missing_ok=True)
    with pytest.raises(PlanError, match=r"does not see the input '.*/in' \(none of the 3 files"):
        list(Source().decode(table, np.arange(6), set(), spec, 10**8, 4, None, witnesses))
    # On the driver's own node the inputs were there when it listed them: removed since, they
    # are error rows, whatever was removed.
    monkeypatch.setattr(visible, "this_node", lambda: "the-driver's-node")
    on_the_drivers = dataclasses.replace(witnesses, driver_node="the-driver's-node")
    blocks = list(Source().decode(table, np.arange(6), set(), spec, 10**8, 4, None,
                                  on_the_drivers))
    assert all("no longer exists" in e for b in blocks for e in b["error"])


def test_only_inputs_the_driver_sees_are_witnesses(tmp_path):
    """An input list is not checked when it is read: its entries may be stale, or on a mount
    the head node lacks. What the driver does not see proves nothing about another node."""
    write_samples(tmp_path / "in", 5, seed=2)
    paths = sorted(str(p) for p in (tmp_path / "in").rglob("*.*"))
    for gone in (paths[0], paths[4]):
        os.remove(gone)
    listing = ListingFile.write(str(tmp_path / "out"), ((p, None) for p in paths))
    assert Witnesses.of("list.txt", str(tmp_path / "out"), listing).inputs == (paths[2],)
    os.remove(paths[2])
    assert Witnesses.of("list.txt", str(tmp_path / "out"), listing).inputs == ()


def test_a_decode_task_or_actor_that_does_not_see_the_output_says_so(tmp_path):
    write_samples(tmp_path / "in", 3, seed=2)
    paths = sorted(str(p) for p in (tmp_path / "in").rglob("*.*"))
    listing = ListingFile.write(str(tmp_path / "out"), ((p, None) for p in paths))
    listing = listing.moved(str(tmp_path / "out"))
    witnesses = Witnesses.of(str(tmp_path / "in"), str(tmp_path / "out"), listing)
    assert witnesses.listing == str(tmp_path / "out" / "_listing.arrow")
    Path(witnesses.listing).unlink()  # what a node without the output's mount sees
    message = r"does not see the output directory '.*/out' \(the listing the driver wrote"
    with pytest.raises(PlanError, match=message):
        list(dataflow._decode_slice(listing, 0, 3, [], str(tmp_path / "out"), Source(),
                                    load_model().spec, 10**8, 4, "run/decode/0", 60.0,
                                    witnesses))
    with pytest.raises(PlanError, match=message):
        Predictor(None, None, 32, 5, output=str(tmp_path / "out"), witnesses=witnesses)


def test_inputs_in_an_object_store_are_never_witnesses(tmp_path):
    listing = ListingFile.write(str(tmp_path), iter([("s3://bucket/a.png", 1),
                                                     ("s3://bucket/b.png", 1)]))
    assert Witnesses.of("s3://bucket/", str(tmp_path), listing).inputs == ()
