"""A cluster that gains nodes mid-run: Ray's own autoscaler on a local fake provider.

The head (1 CPU, no GPU) starts with an autoscaling config whose one worker type has 1 CPU
and 1 (declared) GPU, at most 2 of them (``RAY_FAKE_CLUSTER=1``: Ray's fake multi-node
provider starts real local nodes when the autoscaler asks). The run starts with no GPU node
at all: ``--actors 2`` is a plan the autoscaler can satisfy (without one it is refused), both
actors are asked for at once, and the autoscaler adds the nodes they wait for. (This is Ray's
v1 autoscaler, which does not publish its ceiling: tests/test_plan.py covers the default
actor count from a published one.) Everything binds to 127.0.0.1, uses its own
port, temp dir and auth token, and only what the test started is stopped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time

import poison_model
import pyarrow.parquet as pq
import pytest
from driver import stop_private_ray

import pipeline
from pipeline.digits import write_samples

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs: str) -> dict:
    nothing: list = []
    return {
        "cluster_name": "batch-infer-test", "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 10**8},
                         "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "docker": {}, "initialization_commands": nothing,
        "setup_commands": nothing, "head_setup_commands": nothing,
        "worker_setup_commands": nothing, "head_start_ray_commands": nothing,
        "worker_start_ray_commands": nothing, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def autoscaling_head(tmp_path, monkeypatch):
    import ray

    ray.shutdown()
    ray_tmp = tempfile.mkdtemp(prefix="bi-as-", dir="/tmp")  # short: socket paths live here
    gcs = f"127.0.0.1:{free_port()}"
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    # Token auth off for this head: this test process read RAY_AUTH_MODE when it imported
    # Ray (for the in-process clusters of other tests), so it cannot present a token now. The
    # head listens on 127.0.0.1 only, on a port of its own, and lives for this test.
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_TMPDIR": ray_tmp,
           "RAY_AUTH_MODE": "disabled"}
    # The nodes it starts import tests/poison_model.py: they inherit this environment.
    env["PYTHONPATH"] = poison_model.worker_env()["PYTHONPATH"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        subprocess.run(
            ["ray", "start", "--head", f"--autoscaling-config={config}", "--port",
             gcs.rsplit(":", 1)[1], "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--include-dashboard=false", f"--temp-dir={ray_tmp}",
             "--object-store-memory=100000000"],
            check=True, capture_output=True, timeout=120)
        ray.init(address=gcs, logging_level="WARNING")
        yield gcs
    finally:
        ray.shutdown()
        stop_private_ray(ray_tmp)


def test_a_cluster_that_gains_gpu_nodes_mid_run_uses_them(autoscaling_head, tmp_path):
    import ray

    assert sum(n["Alive"] for n in ray.nodes()) == 1  # the head alone: no GPU yet
    write_samples(tmp_path / "in", 1600, seed=6)
    # Calls slow enough (200 of 0.12 s) that work is left when the second node is up.
    options = poison_model.write_options(tmp_path / "model.json", delay=0.12)
    start = time.time()
    summary = pipeline.run(str(tmp_path / "in"), str(tmp_path / "out"), gpus_per_actor=1,
                           actors=2, platform="cpu", batch_size=8, progress=False,
                           model_fn="poison_model:build", model=options)
    assert summary.plan["actors"] == 2
    assert summary.rows_ok == 1600 == pq.read_table(tmp_path / "out").num_rows
    workers = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and "GPU" in n["Resources"]}
    assert len(workers) == 2, "the autoscaler did not add both GPU nodes"
    used = {a["node_id"] for a in summary.actors}
    assert used == set(workers), summary.actors  # both new nodes did work
    assert all(a["rows"] > 0 for a in summary.actors)
    assert time.time() - start < 600
