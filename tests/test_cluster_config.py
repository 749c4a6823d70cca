"""cluster.yaml against Ray's own launcher schema; k8s/rayjob.yaml against what the job needs."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from pipeline.cli import add_run_arguments, config_from_args

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())


def _job_config(entrypoint: str):
    """Parse a job entrypoint with the job's own argument parser -> RunConfig."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/batch_infer.py"], entrypoint
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_run_arguments(parser)
    return config_from_args(parser.parse_args(argv[2:]))


def test_cluster_yaml_matches_rays_schema(cluster):
    jsonschema.validate(cluster, json.loads(SCHEMA.read_text()))
    # And what `ray up` itself runs before launching anything: defaults filled, then checked.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_cluster_has_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(g\d|p\d)", head["node_config"]["InstanceType"])
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["resources"]["GPU"] >= 1
    assert re.fullmatch(r"(g6e?|g5|p4d|p5)\.\w+", gpu["node_config"]["InstanceType"])
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cluster["max_workers"]
    assert 1 <= cluster["idle_timeout_minutes"] <= 60


def test_cluster_installs_this_package(cluster):
    mounted = {remote: local for remote, local in cluster["file_mounts"].items()}
    repo_on_node = next(remote for remote, local in mounted.items() if local == ".")
    head_setup = cluster["head_setup_commands"]
    assert any(cmd.startswith("pip install") and repo_on_node in cmd for cmd in head_setup)
    assert any(
        f"{repo_on_node}[gpu]" in cmd for cmd in cluster["worker_setup_commands"]
    ), "GPU workers need the CUDA build of jaxlib"
    images = [cluster["docker"]["head_image"], cluster["docker"]["worker_image"]]
    assert len({img.split(":")[1].split("-")[0] for img in images}) == 1  # one Ray version
    assert cluster["docker"]["worker_image"].endswith("-gpu")
    for cmds in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in cmd for cmd in cmds)


def test_rayjob_runs_the_job_entrypoint_on_gpu_workers(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    cfg = _job_config(spec["entrypoint"])
    assert cfg.gpus_per_actor == 1
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = cluster["workerGroupSpecs"]
    worker_pod = group["template"]["spec"]
    (worker,) = worker_pod["containers"]
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == 1 == int(requests["nvidia.com/gpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in worker_pod["tolerations"])
    assert group["minReplicas"] == 0
    assert cfg.actors <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert cluster["enableInTreeAutoscaling"] is True


def test_rayjob_image_is_the_one_the_dockerfile_builds(rayjob):
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    images = {cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    images |= {g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]}
    assert len(images) == 1 and images.pop().split("/")[-1].startswith("batch-infer:")
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base.startswith(cluster["rayVersion"] + "-") and base.endswith("-gpu")
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.MULTILINE).group(1)
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == workdir
    for line in re.findall(r"^COPY .*$", dockerfile, re.MULTILINE):
        *sources, _dest = [w for w in line.split()[1:] if not w.startswith("--")]
        for copied in sources:
            assert (REPO / copied).exists(), f"Dockerfile copies missing {copied}"
    assert (REPO / "jobs" / "batch_infer.py").exists()
