"""The resource plan: how a run uses the cluster it finds, decided before anything starts.

:func:`make_plan` is a pure function of the cluster's shape (:class:`Cluster`), the options and
the model's cost, so a test can assert on it for shapes this machine is not. It guarantees
the one thing Ray will not: that every stage can be scheduled at once. An inference actor
holding the only CPU of a 1-CPU node leaves its decode task pending for ever, and Ray Data
does not report it; a plan that cannot run at all (GPU actors on a cluster without GPUs and
no autoscaler to add some) is a :class:`PlanError`, one line, before anything starts.

Each choice carries its reason in :attr:`Plan.notes`, logged and kept in ``_summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig

# Rows per decoded block, the unit an actor takes per call and a part file holds: up to
# 1024 rows and 64 MB of decoded pixels (416 rows of 224x224 RGB). Ray Data costs a few ms
# per block at each stage; on the 2-core machine 1024-row blocks of small images took 10%
# less time end to end than 512-row ones (batch-infer bench, 20,000 128x96 JPEGs).
MAX_ROWS_PER_BLOCK = 1024
BLOCK_BYTES = 64 * 2**20
# Decoded blocks per decode task. Each task costs Ray Data a scheduling round and a worker
# lease, ~0.1-0.4 s on a busy 2-core machine, during which that decoder idles: with one
# 512-row block per task the two decoders were busy 0.85 of the time, with four 1.2, and the
# run took 15% less time. The task still yields each block as soon as it is decoded.
BLOCKS_PER_TASK = 4
# Device calls in flight per actor: while one block computes, the previous one's results are
# turned into rows and written (the actor runs two calls on two threads, one device lock).
CALLS_PER_ACTOR = 2
# Work per device call that amortises a call's fixed cost (dispatch, launch, transfers:
# ~0.1 ms) on a GPU: 1 TFLOP is ~2-10 ms on an H100/A100/L4 in bfloat16. An estimate from
# XLA's FLOP count, not a measurement: `batch-infer gpu-check` sweeps device batches on the
# node and shows where throughput stops growing.
GPU_FLOPS_PER_CALL = 1e12
# A shard (tar, Parquet) is read whole into a decode task's memory, then decoded: ask Ray for
# about twice its size, so two big shards never land on a node that can hold one.
SHARD_MEMORY_FACTOR = 2


class PlanError(ValueError):
    """The cluster cannot run this plan; the message says what is missing."""


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    cpus: float
    gpus: float
    memory: float  # bytes Ray may hand to tasks and actors
    head: bool = False


@dataclass(frozen=True)
class Cluster:
    """The nodes alive now, and what an autoscaler may add (None: no autoscaler)."""

    nodes: tuple[Node, ...]
    max_cpus: float | None = None  # the autoscaler's ceiling, whole cluster; inf: unbounded
    max_gpus: float | None = None

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def autoscaling(self) -> bool:
        return self.max_cpus is not None

    @classmethod
    def from_ray(cls) -> Cluster:
        import ray

        nodes = tuple(
            Node(
                node_id=n["NodeID"], ip=n.get("NodeManagerAddress", "?"),
                cpus=float(n["Resources"].get("CPU", 0)), gpus=float(n["Resources"].get("GPU", 0)),
                memory=float(n["Resources"].get("memory", 0)),
                head="node:__internal_head__" in n["Resources"],
            )
            for n in ray.nodes() if n.get("Alive")
        )
        max_cpus, max_gpus = _autoscaler_ceiling()
        return cls(nodes, max_cpus, max_gpus)


@dataclass(frozen=True)
class Plan:
    platform: str  # what the actors compute on
    actors: int  # the pool's size, all requested at once
    actor_cpus: float
    actor_gpus: float
    calls_per_actor: int
    decode_cpus: float  # per decode task
    decode_slots: int  # decode tasks the cluster runs at once beside the actors
    decode_memory: int | None  # bytes per decode task (shards), None: Ray's default
    rows_per_block: int
    units_per_task: int
    device_batch_size: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_plan(
    cfg: RunConfig, cluster: Cluster, *, units: int, image_bytes: int,
    flops_per_image: float | None = None, largest_shard: int | None = None,
) -> Plan:
    """Decide actors, CPUs, GPUs, block and batch sizes for ``units`` inputs (files or shards)
    of ``image_bytes`` decoded bytes each, on ``cluster``."""
    notes: list[str] = []
    if cluster.cpus <= 0:
        raise PlanError("The Ray cluster has no CPUs: decoding images needs at least one.")
    if cfg.gpus_per_actor > 0:
        actors, actor_cpus = _gpu_actors(cfg, cluster, notes)
    else:
        actors, actor_cpus = _cpu_actors(cfg, cluster, notes)
    decode_cpus, actor_cpus = _decode_cpus(cfg, cluster, actors, actor_cpus, notes)
    live_actors = min(actors, _fits_now(cfg, cluster))
    slots = max(1, int((cluster.cpus - live_actors * actor_cpus) / decode_cpus + 1e-9))
    notes.append(f"{slots} decode task(s) at a time at {decode_cpus} CPU each")
    device_batch = _device_batch(cfg, image_bytes, flops_per_image, notes)
    rows = rows_per_block(units, actors, device_batch, image_bytes)
    memory = None
    if largest_shard:
        memory = SHARD_MEMORY_FACTOR * largest_shard
        biggest = max((n.memory for n in cluster.nodes), default=0)
        if biggest and memory > biggest and not cluster.autoscaling:
            raise PlanError(
                f"The largest shard is {largest_shard / 2**30:.1f} GiB; decoding it needs about "
                f"{memory / 2**30:.1f} GiB in one task, but the largest node offers "
                f"{biggest / 2**30:.1f} GiB. Split the shards (under about 1 GB each)."
            )
        notes.append(f"shard tasks ask for {memory / 2**20:.0f} MiB (2 x the largest shard)")
    return Plan(
        platform=cfg.actor_platform, actors=actors, actor_cpus=actor_cpus,
        actor_gpus=cfg.gpus_per_actor, calls_per_actor=CALLS_PER_ACTOR,
        decode_cpus=decode_cpus, decode_slots=slots, decode_memory=memory,
        rows_per_block=rows, units_per_task=units_per_task(units, rows, slots),
        device_batch_size=device_batch, notes=tuple(notes),
    )


def _gpu_actors(cfg: RunConfig, cluster: Cluster, notes: list[str]) -> tuple[int, float]:
    per_actor = cfg.gpus_per_actor
    now = _fits_now(cfg, cluster)
    ceiling = now
    if cluster.autoscaling:
        most = cluster.max_gpus
        ceiling = math.inf if math.isinf(most) else int(most / per_actor + 1e-9)
    if cfg.actors:
        actors = cfg.actors
        if actors > ceiling:
            where = ("the autoscaler may grow it to " f"{cluster.max_gpus:g}" if cluster.autoscaling
                     else "it has no autoscaler to add more")
            raise PlanError(
                f"{actors} actors x {per_actor:g} GPU need {actors * per_actor:g} GPUs; the "
                f"cluster has {cluster.gpus:g} and {where}. Lower --actors or "
                "--gpus-per-actor."
            )
    elif math.isinf(ceiling):
        actors = max(1, now)
        notes.append("the autoscaler has no GPU ceiling: one actor per GPU present now "
                     "(pass --actors to ask for more)")
    else:
        actors = ceiling
    if actors < 1:
        raise PlanError(
            f"--gpus-per-actor {per_actor:g} asks for GPU actors, but no node of the cluster has "
            f"{per_actor:g} GPU(s) free and there is no autoscaler to add one. Run on CPU "
            "(no --gpus-per-actor), or join a cluster with GPUs (--address)."
        )
    notes.append(f"{actors} GPU actor(s) x {per_actor:g} GPU ({now} fit on the nodes up now)")
    # A GPU actor's host work (batching, results, Parquet) wants a core of its own, unless a
    # GPU node has fewer cores than actors: then it gets its share.
    hosts = [n for n in cluster.nodes if n.gpus >= per_actor - 1e-9]
    share = min((n.cpus / max(1, int(n.gpus / per_actor + 1e-9)) for n in hosts), default=1.0)
    return actors, _floor_quarter(min(1.0, share))


def _cpu_actors(cfg: RunConfig, cluster: Cluster, notes: list[str]) -> tuple[int, float]:
    hosts = [n for n in cluster.nodes if n.cpus > 0]
    # XLA:CPU already uses every core of its machine: a second CPU actor on a node only fights
    # the first for them. One per node that has CPUs.
    actors = cfg.actors or len(hosts)
    per_node = math.ceil(actors / len(hosts))
    smallest = min(n.cpus for n in hosts)
    # The actor's CPU is a token for Ray's scheduler (XLA uses the cores it finds): keep it
    # small enough that every node also fits a decode task beside its actors.
    actor_cpus = _floor_quarter(min(1.0, smallest / 2 / per_node))
    notes.append(f"{actors} CPU actor(s), {actor_cpus} CPU each"
                 + (" (one per node)" if not cfg.actors else ""))
    return actors, actor_cpus


def _decode_cpus(
    cfg: RunConfig, cluster: Cluster, actors: int, actor_cpus: float, notes: list[str]
) -> tuple[float, float]:
    """CPUs per decode task, and the actors' CPUs shrunk if nothing would be left to decode."""
    if cfg.gpus_per_actor > 0:
        # On a GPU cluster decode is the bottleneck and has cores to itself: one Pillow process
        # per core (two per core gain nothing and double the memory).
        decode = 1.0
    else:
        # On a small CPU node the actor is mostly idle (the digits CNN is ~4x cheaper than a
        # decode): two half-CPU decoders per spare core keep both cores of a laptop busy.
        smallest = min(n.cpus for n in cluster.nodes if n.cpus > 0)
        decode = 0.5 if smallest <= 2 else 1.0
    live = min(actors, _fits_now(cfg, cluster))
    spare = cluster.cpus - live * actor_cpus
    if spare < decode:
        decode = 0.5
    if spare < decode:
        actor_cpus = _floor_quarter(max(0.0, (cluster.cpus - decode) / max(live, 1)))
        notes.append(f"actors get {actor_cpus} CPU each so that decoding can run beside them")
    return decode, actor_cpus


def _fits_now(cfg: RunConfig, cluster: Cluster) -> int:
    """How many actors the nodes up now can hold."""
    if cfg.gpus_per_actor > 0:
        return sum(int(n.gpus / cfg.gpus_per_actor + 1e-9) for n in cluster.nodes)
    return cfg.actors or sum(1 for n in cluster.nodes if n.cpus > 0)


def _device_batch(
    cfg: RunConfig, image_bytes: int, flops: float | None, notes: list[str]
) -> int:
    unit = cfg.batch_size
    if cfg.device_batch_size:
        return cfg.device_batch_size
    if cfg.actor_platform == "cpu":
        # XLA:CPU is busy at 32 rows already; bigger calls only delay the first result.
        return unit
    cap = max(unit, min(MAX_ROWS_PER_BLOCK, BLOCK_BYTES // image_bytes) // unit * unit)
    if not flops:
        notes.append(f"device batch {cap} rows (no FLOP estimate for this model)")
        return cap
    wanted = unit * math.ceil(GPU_FLOPS_PER_CALL / flops / unit)
    batch = max(unit, min(cap, wanted))
    notes.append(f"device batch {batch} rows (~{batch * flops / 1e9:.0f} GFLOP per call)")
    return batch


def rows_per_block(n: int, actors: int, device_batch: int, image_bytes: int) -> int:
    """Rows per decoded block: a whole number of device batches, at most MAX_ROWS_PER_BLOCK
    rows and BLOCK_BYTES of images (but one device batch at least), and small enough that a
    small input still makes two blocks per actor: a block goes to one actor, so 200 images in
    one block would keep every GPU but one idle."""
    cap = min(MAX_ROWS_PER_BLOCK, BLOCK_BYTES // image_bytes) // device_batch * device_batch
    per_actor = -(-n // (2 * actors))
    return max(device_batch, min(cap, device_batch * -(-per_actor // device_batch)))


def units_per_task(n: int, rows: int, slots: int) -> int:
    """Units (files) per decode task: up to BLOCKS_PER_TASK blocks, but at least two tasks per
    decode slot, so that a large cluster still decodes on every CPU."""
    per_slot = -(-n // (2 * slots))
    return rows * max(1, min(BLOCKS_PER_TASK, per_slot // rows))


def _floor_quarter(x: float) -> float:
    return math.floor(x * 4 + 1e-9) / 4


def _autoscaler_ceiling() -> tuple[float | None, float | None]:
    """(CPUs, GPUs) the autoscaler may grow the cluster to (inf: unbounded or unknown), or
    (None, None) when the cluster has no autoscaler.

    Where the GCS holds the cluster's node groups with their maximum counts (the
    ``ClusterConfig`` Ray Data reads too), they give the ceiling. Ray 2.60's own autoscalers
    do not publish it: v1 publishes a status, whose node types are the config's names where
    there is a config (a head started without one names each node ``node_<id>``), so it counts
    as an autoscaler with an unknown ceiling; v2 publishes neither (cluster.yaml runs v1 on
    purpose), and a v2 cluster is planned for the nodes it has.
    """
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older Ray or a client connection: plan for the nodes seen
        return None, None
    groups = [g for g in (config.node_group_configs if config else []) if g.resources]
    if not groups:
        return (math.inf, math.inf) if _legacy_autoscaler() else (None, None)
    if not any(g.max_count == -1 or g.max_count > g.min_count for g in groups):
        return None, None
    totals = {"CPU": 0.0, "GPU": 0.0}
    for g in groups:
        for key in totals:
            amount = float(g.resources.get(key, 0))
            if amount:
                totals[key] += math.inf if g.max_count == -1 else amount * g.max_count
    return totals["CPU"], totals["GPU"]


def _legacy_autoscaler() -> bool:
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get("__autoscaling_status") or "{}")
    except Exception:  # no status, or not JSON: nothing to go on
        return False
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(not name.startswith("node_") for name in types.values())
