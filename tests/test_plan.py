"""The resource plan (pipeline/plan.py) for cluster shapes this machine is not: no Ray here,
the plan is a function of the cluster's shape. tests/test_cluster_shapes.py runs the same
shapes on real local Ray clusters."""

from __future__ import annotations

import math

import pytest

from pipeline.config import RunConfig
from pipeline.plan import (
    BLOCK_BYTES,
    BLOCKS_PER_TASK,
    MAX_ROWS_PER_BLOCK,
    Cluster,
    Node,
    PlanError,
    make_plan,
    rows_per_block,
    units_per_task,
)

DIGIT = 32 * 32  # decoded bytes of one bundled-model input
PHOTO = 224 * 224 * 3


def node(cpus: float, gpus: float = 0, memory: float = 8e9, name: str = "n") -> Node:
    return Node(node_id=name, ip="127.0.0.1", cpus=cpus, gpus=gpus, memory=memory)


def cfg(**options) -> RunConfig:
    return RunConfig(input="in", output="out", **options)


def fits(plan, cluster: Cluster) -> bool:
    """Can every live actor and at least one decode task hold their CPUs at once, actors
    spread one per node (Ray Data spreads them) and decode anywhere?"""
    free = [n.cpus for n in cluster.nodes]
    placed = 0
    for i, n in enumerate(cluster.nodes):
        room = int(n.gpus / plan.actor_gpus + 1e-9) if plan.actor_gpus else math.inf
        while placed < plan.actors and room > 0 and free[i] >= plan.actor_cpus - 1e-9:
            free[i] -= plan.actor_cpus
            placed += 1
            room -= 1
            if not plan.actor_gpus:
                break  # one per node first
    return any(f >= plan.decode_cpus - 1e-9 for f in free)


@pytest.mark.parametrize("shape", [
    (node(1),),  # a 1-CPU laptop container: the actor used to take the only CPU
    (node(1), node(1), node(1)),  # three 1-CPU nodes
    (node(2),),
    (node(0.5),),
])
def test_cpu_runs_always_leave_room_to_decode(shape):
    cluster = Cluster(shape)
    plan = make_plan(cfg(), cluster, units=300, image_bytes=DIGIT)
    assert plan.actors == len(shape) and plan.actor_gpus == 0
    assert fits(plan, cluster), plan
    assert plan.decode_slots >= 1 and plan.platform == "cpu"


def test_one_cpu_node_plan_numbers():
    plan = make_plan(cfg(), Cluster((node(1),)), units=300, image_bytes=DIGIT)
    assert (plan.actor_cpus, plan.decode_cpus, plan.decode_slots) == (0.5, 0.5, 1)


def test_a_laptop_keeps_two_half_cpu_decoders_beside_the_actor():
    plan = make_plan(cfg(), Cluster((node(2),)), units=20_000, image_bytes=DIGIT)
    assert (plan.actors, plan.actor_cpus, plan.decode_cpus, plan.decode_slots) == (1, 1.0, 0.5, 2)
    assert plan.device_batch_size == 32 and plan.rows_per_block == MAX_ROWS_PER_BLOCK


def test_more_cpu_actors_than_nodes_still_leave_a_decoder_per_node():
    cluster = Cluster((node(1), node(1), node(1)))
    plan = make_plan(cfg(actors=6), cluster, units=1000, image_bytes=DIGIT)
    assert plan.actors == 6 and plan.actor_cpus == 0.25 and fits(plan, cluster)


def test_gpu_node_with_one_cpu_beside_cpu_nodes_decodes_on_the_cpu_nodes():
    cluster = Cluster((node(1, gpus=1, name="gpu"), node(1, name="a"), node(1, name="b")))
    plan = make_plan(cfg(gpus_per_actor=1, platform="cpu"), cluster, units=500,
                     image_bytes=DIGIT)
    assert (plan.actors, plan.actor_gpus, plan.actor_cpus) == (1, 1, 1.0)
    # The GPU node's one CPU is the actor's: decode fits only on the two CPU nodes.
    assert plan.decode_cpus == 1.0 and plan.decode_slots == 2


def test_a_lone_gpu_node_with_one_cpu_shares_it():
    cluster = Cluster((node(1, gpus=1),))
    plan = make_plan(cfg(gpus_per_actor=1), cluster, units=500, image_bytes=DIGIT)
    assert plan.actor_cpus + plan.decode_cpus <= 1 and plan.decode_slots == 1


def test_gpu_actors_default_to_one_per_gpu_and_a_cpu_each():
    cluster = Cluster((node(0, name="head"), node(8, gpus=4), node(8, gpus=4)))
    plan = make_plan(cfg(gpus_per_actor=1), cluster, units=10**6, image_bytes=PHOTO,
                     flops_per_image=8.2e9)
    assert plan.actors == 8 and plan.actor_cpus == 1.0 and plan.decode_slots == 8
    assert plan.platform == "gpu" and plan.device_batch_size == 128  # 1 TFLOP per call
    assert plan.rows_per_block % plan.device_batch_size == 0
    half = make_plan(cfg(gpus_per_actor=0.5), cluster, units=10**6, image_bytes=PHOTO)
    assert half.actors == 16 and fits(half, cluster)  # 16 actors on 16 CPUs: they share


def test_plans_that_cannot_run_are_one_clear_line():
    no_gpus = Cluster((node(4), node(4)))
    with pytest.raises(PlanError, match=r"no node of the cluster has 1 GPU\(s\) free"):
        make_plan(cfg(gpus_per_actor=1), no_gpus, units=10, image_bytes=DIGIT)
    two_gpus = Cluster((node(4, gpus=2),))
    with pytest.raises(PlanError, match=r"3 actors x 1 GPU need 3 GPUs; the cluster has 2 and "
                                        r"it has no autoscaler"):
        make_plan(cfg(gpus_per_actor=1, actors=3), two_gpus, units=10, image_bytes=DIGIT)
    with pytest.raises(PlanError, match="no CPUs"):
        make_plan(cfg(), Cluster((node(0, gpus=1),)), units=10, image_bytes=DIGIT)
    with pytest.raises(PlanError, match=r"largest shard is 20.0 GiB.*40.0 GiB"):
        make_plan(cfg(input_format="tar"), Cluster((node(4, memory=16 * 2**30),)), units=3,
                  image_bytes=DIGIT, largest_shard=20 * 2**30)


def test_an_autoscaler_sets_the_ceiling_and_the_default():
    empty = Cluster((node(2, name="head"),), max_cpus=34, max_gpus=8)
    plan = make_plan(cfg(gpus_per_actor=1), empty, units=10**5, image_bytes=PHOTO)
    assert plan.actors == 8  # every GPU the autoscaler may add, asked for at once
    with pytest.raises(PlanError, match="may grow it to 8"):
        make_plan(cfg(gpus_per_actor=1, actors=9), empty, units=10, image_bytes=PHOTO)
    unbounded = Cluster((node(2), node(4, gpus=1)), max_cpus=math.inf, max_gpus=math.inf)
    plan = make_plan(cfg(gpus_per_actor=1), unbounded, units=10, image_bytes=PHOTO)
    assert plan.actors == 1 and any("--actors" in n for n in plan.notes)


def test_shard_tasks_ask_for_twice_the_largest_shard():
    plan = make_plan(cfg(input_format="tar"), Cluster((node(8, memory=64e9),)), units=40,
                     image_bytes=PHOTO, largest_shard=2**30)
    assert plan.decode_memory == 2 * 2**30


@pytest.mark.parametrize("n, actors, batch, image, want", [
    (20_000, 1, 32, DIGIT, 1024),  # many small images: the row cap
    (20_000, 1, 32, PHOTO, 416),  # photos: the 64 MB cap, a whole number of batches
    (200, 1, 32, DIGIT, 128),  # small input: two blocks per actor (100 -> 128)
    (200, 4, 32, DIGIT, 32),  # four actors: 25 each -> one batch
    (31, 1, 32, DIGIT, 32),
    (10**6, 8, 128, PHOTO, 384),  # device batches of 128: 3 of them fit in 64 MB
    (100, 1, 32, 4000 * 3000 * 3, 32),  # one image over 64 MB: still one batch a block
])
def test_rows_per_block(n, actors, batch, image, want):
    """Exact values, so a rows_per_block that always returns the batch size (or ignores the
    byte cap, or the two-blocks-per-actor rule) fails."""
    assert rows_per_block(n, actors, batch, image) == want


@pytest.mark.parametrize("n", [1, 31, 200, 2_000, 20_000, 1_000_003])
@pytest.mark.parametrize("slots", [1, 2, 60])
def test_tasks_cover_every_unit(n, slots):
    rows = rows_per_block(n, 1, 32, DIGIT)
    per_task = units_per_task(n, rows, slots)
    assert per_task % rows == 0 and per_task <= BLOCKS_PER_TASK * rows
    tasks = -(-n // per_task)
    if n >= 2 * slots * BLOCKS_PER_TASK * rows:  # big input: big tasks
        assert per_task == BLOCKS_PER_TASK * rows
    if n >= 2 * slots * rows:  # enough work: every decode slot gets two tasks
        assert tasks >= 2 * slots
    assert rows * DIGIT <= BLOCK_BYTES
