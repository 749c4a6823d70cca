"""Several nodes on one machine: a CPU head and two worker nodes declaring one GPU each.

The GPUs are logical (Ray only counts them): the runs pass ``platform="cpu"``, the documented
override that reserves GPUs but computes on the CPU (without it, an actor that reserved a GPU
and finds none stops the run: tests/test_device.py). What is real: Ray's placement of
``--gpus-per-actor 1`` actors, and the pipeline's output across nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import label_of

import pipeline
from pipeline.models import digits_cnn

TESTS_DIR = str(Path(__file__).resolve().parent)
RECORD_ENV = "BATCH_INFER_TEST_PLACEMENT_DIR"

pytestmark = pytest.mark.slow


def located_digits(path: str | None):
    """Model factory (``--model-fn test_multinode:located_digits``): the bundled CNN, and a
    record of where each inference actor loaded it."""
    import jax
    import ray

    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is not None:  # the driver loads the model too; record actors only
        record = {
            "node": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "jax_backend": jax.default_backend(),
        }
        out = Path(os.environ[RECORD_ENV]) / f"{ctx.get_actor_id()}.json"
        out.write_text(json.dumps(record))
    return digits_cnn.build(path)


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """Head (1 CPU, no GPU) + 2 nodes with 1 CPU and 1 logical GPU each, all on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    records = tmp_path_factory.mktemp("placement")
    # Cluster() writes its address to $RAY_TMPDIR/ray/ray_current_cluster, where every plain
    # ray.init() on this machine would find and join it (and its shutdown deletes that file,
    # whoever wrote it): keep both in a directory of our own. Short: socket paths live there.
    ray_tmp = tempfile.mkdtemp(prefix="bi-mn-", dir="/tmp")
    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)
        # Worker processes inherit the environment of the raylets started here: that is how
        # the factory above gets imported in the actors and finds where to write.
        path = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
        mp.setenv("PYTHONPATH", path)
        mp.setenv(RECORD_ENV, str(records))
        node_args = {"node_ip_address": "127.0.0.1", "object_store_memory": 150 * 1024**2}
        cluster = Cluster(
            initialize_head=True,
            head_node_args={**node_args, "num_cpus": 1, "include_dashboard": False},
        )
        gpu_nodes = [cluster.add_node(**node_args, num_cpus=1, num_gpus=1) for _ in range(2)]
        try:
            ray.init(address=cluster.address, logging_level="WARNING")
            yield {"records": records, "gpu_nodes": {n.node_id for n in gpu_nodes},
                   "head": cluster.head_node.node_id}
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_one_actor_per_gpu_node_and_every_row_written(gpu_cluster, tmp_path, monkeypatch):
    import ray

    from pipeline.digits import write_samples

    # The pool asks for both actors at once, but on 2 busy cores the run can end before the
    # second has imported JAX; hold the start until both are up so both placements are seen.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    images = tmp_path / "images"
    write_samples(images, 200, seed=3)  # enough batches that the pool grows to both GPUs
    out = tmp_path / "out"
    summary = pipeline.run(
        str(images), str(out), gpus_per_actor=1, platform="cpu",
        model_fn="test_multinode:located_digits", progress=False,
    )

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 200 == summary.rows_ok
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.rglob("*.*"))
    assert sum(r["label_name"] == label_of(r["path"]) for r in rows) >= 190

    placements = [json.loads(p.read_text()) for p in gpu_cluster["records"].glob("*.json")]
    nodes = [p["node"] for p in placements]
    assert len(placements) == 2, placements  # one actor per GPU: the pool's size
    assert set(nodes) == gpu_cluster["gpu_nodes"]  # one on each GPU node, none on the head
    for p in placements:
        assert len(p["gpu_ids"]) == 1 and p["cuda_visible_devices"] == p["gpu_ids"][0]
        assert p["jax_backend"] == "cpu"  # a logical GPU, computing on the CPU as asked
