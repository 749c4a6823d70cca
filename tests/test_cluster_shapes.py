"""Cluster shapes users have and this 2-core machine is not, on real local Ray clusters: a
1-CPU node, three 1-CPU nodes, a node with a (declared) GPU and one CPU beside CPU-only nodes.
Each run used to hang for ever (an actor holding the only CPU a decode task needed); now the
resource plan leaves room, and a run that does not finish in time fails the test instead of
blocking it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pyarrow.parquet as pq
import pytest
from conftest import finishes

import pipeline
from pipeline.digits import write_samples

pytestmark = pytest.mark.slow

ONE_CPU = textwrap.dedent("""
    import json, sys, ray
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR")
    import pipeline
    s = pipeline.run(sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps({"ok": s.rows_ok, "plan": s.plan}))
""")


def test_a_one_cpu_ray_completes(tmp_path):
    write_samples(tmp_path / "in", 300, seed=1)
    ray_tmp = tempfile.mkdtemp(prefix="bi-1cpu-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run(
            [sys.executable, "-c", ONE_CPU, str(tmp_path / "in"), str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("a run on a 1-CPU Ray did not finish in 300 s (the old hang)")
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["ok"] == 300
    assert got["plan"]["actor_cpus"] + got["plan"]["decode_cpus"] <= 1


@pytest.fixture(scope="module")
def three_nodes():
    """Head (1 CPU) and two workers on loopback: one with 1 CPU and a declared GPU, one with
    1 CPU; the head has the dashboard, for the state API (where did each task run?)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    ray_tmp = tempfile.mkdtemp(prefix="bi-shape-", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        store = {"node_ip_address": "127.0.0.1", "object_store_memory": 120 * 1024**2}
        cluster = Cluster(initialize_head=True, head_node_args={
            **store, "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
        gpu = cluster.add_node(**store, num_cpus=1, num_gpus=1)
        cpu = cluster.add_node(**store, num_cpus=1)
        try:
            cluster.wait_for_nodes()
            ctx = ray.init(address=cluster.address, logging_level="WARNING")
            yield {"dashboard": f"http://{ctx.dashboard_url}", "gpu": gpu.node_id,
                   "cpu": {cpu.node_id, cluster.head_node.node_id}}
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_three_one_cpu_nodes_complete(three_nodes, tmp_path):
    write_samples(tmp_path / "in", 300, seed=2)
    summary = finishes(240, lambda: pipeline.run(str(tmp_path / "in"), str(tmp_path / "out"),
                                                 progress=False))
    assert summary.rows_ok == 300 and pq.read_table(tmp_path / "out").num_rows == 300
    assert summary.plan["actors"] == 3 and summary.plan["actor_cpus"] == 0.5


def test_decode_runs_on_the_cpu_nodes_beside_a_gpu_node_with_one_cpu(three_nodes, tmp_path):
    from ray.util.state import list_tasks

    write_samples(tmp_path / "in", 300, seed=3)
    started = time.time() * 1000
    summary = finishes(240, lambda: pipeline.run(str(tmp_path / "in"), str(tmp_path / "out"),
                                                 gpus_per_actor=1, platform="cpu",
                                                 progress=False))
    assert summary.rows_ok == 300
    assert summary.plan["actor_cpus"] == 1.0 and summary.plan["decode_slots"] == 2
    (actor,) = summary.actors
    assert actor["rows"] == 300
    deadline = time.monotonic() + 60  # the state API lags the tasks a little
    while True:
        tasks = [t for t in list_tasks(address=three_nodes["dashboard"], detail=True,
                                       limit=10_000, timeout=60)
                 if "Read" in t.name and (t.creation_time_ms or 0) >= started]
        if tasks and all(t.node_id for t in tasks) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert tasks, "no decode task found in the state API"
    nodes = {t.node_id for t in tasks}
    assert nodes <= three_nodes["cpu"], "a decode task ran on the GPU node"
