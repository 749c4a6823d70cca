"""cluster.yaml against Ray's own launcher schema; k8s/rayjob.yaml against what the job needs;
both against the decode sizing arithmetic their comments state, and the resource plan."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from pipeline.cli import add_run_arguments, config_from_args
from pipeline.plan import Cluster, Node, make_plan

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# The sizing both files state in a comment, redone here without comments. Decode of 1024x768
# photo-like JPEGs to ResNet-50's 224x224 center crop, one process on one core alone,
# measured with `python -m pipeline.bench_decode` (CPU time, Pillow 13): ~160 images/s. A
# Ray CPU is a vCPU; with both hyperthreads of every core busy each gives ~0.6 of that
# (assumed). An L4-class GPU runs ResNet-50 at ~3,000 images/s (assumed from published
# 2,000-4,000 bf16 figures; XLA's rate is not measured here). So one GPU needs
# ceil(3000 / (160 x 0.6)) = ceil(31.25) = 32 vCPUs of decode.
DECODE_IMAGES_PER_S_PER_CORE = 160
VCPU_SHARE_OF_CORE = 0.6
GPU_IMAGES_PER_S = 3000
DECODE_VCPUS_PER_GPU = math.ceil(
    GPU_IMAGES_PER_S / (DECODE_IMAGES_PER_S_PER_CORE * VCPU_SHARE_OF_CORE))
PHOTO = 224 * 224 * 3  # decoded bytes per image


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


def _stated_vcpus_per_gpu(path: Path) -> int:
    """The ``DECODE_VCPUS_PER_GPU = ... -> N`` a config's sizing comment arrives at."""
    found = re.findall(r"DECODE_VCPUS_PER_GPU = [^\n]*?-> (\d+)", path.read_text())
    assert len(found) == 1, f"{path.name} states DECODE_VCPUS_PER_GPU {len(found)} times"
    return int(found[0])


def _header_job_command(path: Path) -> str:
    """The `ray job submit ... -- python jobs/batch_infer.py ...` example in a file's header
    comment, its continuation lines joined: the entrypoint part after `--`."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines()
             if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if "ray job submit" in line)
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command).split(" -- ", 1)[1]


def _groups(cluster: dict) -> tuple[dict, dict]:
    """cluster.yaml's (GPU worker type, CPU worker type)."""
    types = cluster["available_node_types"]
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    (gpu,) = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    (cpu,) = [t for t in workers if t["resources"].get("GPU", 0) == 0]
    return gpu, cpu


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
    gpu, _ = _groups(cluster)
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


def test_cluster_has_autoscaling_cpu_workers_sized_for_decode(cluster):
    """Docstring of DECODE_VCPUS_PER_GPU: at the GPU group's largest, the CPU workers alone
    hold that many vCPUs per GPU (the head's and the GPU workers' spare CPUs are headroom)."""
    assert _stated_vcpus_per_gpu(REPO / "cluster.yaml") == DECODE_VCPUS_PER_GPU
    gpu, cpu = _groups(cluster)
    assert re.fullmatch(r"(c|m)\d+[a-z]*\.\w+", cpu["node_config"]["InstanceType"])
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    gpus = gpu["max_workers"] * gpu["resources"]["GPU"]
    assert cpu["max_workers"] * cpu["resources"]["CPU"] >= gpus * DECODE_VCPUS_PER_GPU
    assert gpu["max_workers"] + cpu["max_workers"] <= cluster["max_workers"]
    # No CUDA on decode nodes, and the package without its [gpu] extra.
    assert cpu["docker"]["worker_image"].endswith("-cpu")
    assert cpu["docker"]["worker_image"].split(":")[1].split("-")[0] == (
        cluster["docker"]["worker_image"].split(":")[1].split("-")[0])
    (install,) = cpu["worker_setup_commands"]
    assert install.startswith("pip install") and "[gpu]" not in install
    # Each GPU worker leaves its actor 1 CPU (pipeline/plan.py) and decodes on the rest.
    assert gpu["resources"]["CPU"] >= gpu["resources"]["GPU"] + 1


def test_a_cold_cluster_yaml_plans_the_header_command(cluster):
    """Right after `ray up` only the head is up: the plan needs a CPU there, and must see an
    autoscaler (v1: the head is started with v2 off) to accept --actors beyond the GPUs up."""
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["CPU"] >= 1
    assert any("RAY_enable_autoscaler_v2=0 " in cmd and "ray start --head" in cmd
               for cmd in cluster["head_start_ray_commands"])
    cfg = _job_config(_header_job_command(REPO / "cluster.yaml"))
    gpu, _ = _groups(cluster)
    assert cfg.gpus_per_actor == gpu["resources"]["GPU"]
    assert cfg.actors <= gpu["max_workers"]
    cold = Cluster((Node("head", "10.0.0.1", head["resources"]["CPU"], 0, 16e9, head=True),),
                   max_cpus=math.inf, max_gpus=math.inf)  # v1: an autoscaler, no ceiling
    plan = make_plan(cfg, cold, units=100_000, image_bytes=PHOTO)
    assert plan.actors == cfg.actors and plan.actor_cpus == 1 and plan.decode_cpus == 1


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
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    worker_pod = group["template"]["spec"]
    (worker,) = worker_pod["containers"]
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == 1 == int(requests["nvidia.com/gpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in worker_pod["tolerations"])
    assert group["minReplicas"] == 0
    assert cfg.actors <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert cluster["enableInTreeAutoscaling"] is True


def _pod_limits(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Ray sees the limits
    return resources["limits"]


def test_rayjob_has_an_autoscaling_cpu_group_sized_for_decode(rayjob):
    """As for cluster.yaml: at the GPU group's largest, the cpu pods alone hold
    DECODE_VCPUS_PER_GPU vCPUs per GPU; and the pods the cluster starts with (the head takes
    no tasks) give the plan a CPU and an actor's GPU when the job starts."""
    assert _stated_vcpus_per_gpu(REPO / "k8s" / "rayjob.yaml") == DECODE_VCPUS_PER_GPU
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    gpu, cpu = groups["gpu"], groups["cpu"]
    gpu_limits, cpu_limits = _pod_limits(gpu), _pod_limits(cpu)
    assert "nvidia.com/gpu" not in cpu_limits
    assert "tolerations" not in cpu["template"]["spec"]  # stays off the GPU nodes
    assert cpu["minReplicas"] == 0 < cpu["maxReplicas"]
    gpus = gpu["maxReplicas"] * int(gpu_limits["nvidia.com/gpu"])
    assert cpu["maxReplicas"] * int(cpu_limits["cpu"]) >= gpus * DECODE_VCPUS_PER_GPU
    assert int(gpu_limits["cpu"]) >= int(gpu_limits["nvidia.com/gpu"]) + 1

    cfg = _job_config(rayjob["spec"]["entrypoint"])
    head_cpus = float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 1))
    nodes = [Node("head", "10.0.0.1", head_cpus, 0, 8e9, head=True)]
    nodes += [Node(f"gpu{i}", "10.0.1.1", float(gpu_limits["cpu"]), 1, 12e9)
              for i in range(gpu["replicas"])]
    nodes += [Node(f"cpu{i}", "10.0.2.1", float(cpu_limits["cpu"]), 0, 54e9)
              for i in range(cpu["replicas"])]
    plan = make_plan(cfg, Cluster(tuple(nodes), max_cpus=math.inf, max_gpus=math.inf),
                     units=100_000, image_bytes=PHOTO)
    assert plan.actors == cfg.actors and plan.actor_cpus == 1 and plan.decode_cpus == 1


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
