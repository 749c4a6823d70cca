"""What the driver learns while a run goes: the part records it counts (:class:`Stats`), and
what it tells a front end (:class:`Observer`): where the run stands, and events the user
should know of, in words (:class:`Watch`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.infer import STAGES
from pipeline.write import Tally

TIMELINE_POINTS = 400  # (seconds, rows) pairs kept for the report's throughput chart


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for a status line: rows written (this run), of ``expected``
    (None where unknown until read, as for shards), errors so far, elapsed seconds."""

    rows: int
    expected: int | None
    errors: int
    seconds: float


class Observer:
    """What a front end (the CLI, the Ray Job) hears of a run; every method may be left as is.
    ``started`` gets what will run (inputs, model, the plan) once it is decided, ``progress``
    follows each committed part, ``event`` says what the user should know, in words."""

    quiet = False  # True: a Ray started for the run keeps its workers' output in log files

    def ray_starting(self) -> None:
        pass

    def started(self, info: dict[str, Any]) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass

    def event(self, message: str) -> None:
        pass


class Stats:
    """Counts the part records as they come: rows, stage seconds, parts, actors, timeline."""

    def __init__(self, start: float):
        self.start = start
        self.rows = 0
        self.parts = 0
        self.seconds = dict.fromkeys((*STAGES, "write"), 0.0)
        self.actors: dict[tuple[str, int], dict[str, Any]] = {}
        self.timeline: list[list[float]] = [[0.0, 0]]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, batch: dict[str, np.ndarray], tally: Tally) -> None:
        for i in range(len(batch["part"])):
            rows = int(batch["rows"][i])
            self.rows += rows
            self.parts += 1
            part = Tally(ok=int(batch["ok"][i]), error=int(batch["error"][i]))
            for kind, info in json.loads(batch["kinds"][i]).items():
                part.kinds[kind] += info["count"]
                part.examples[kind] = info["examples"]
            tally.merge(part)
            for stage in self.seconds:
                self.seconds[stage] += float(batch[f"t_{stage}"][i])
            key = (str(batch["node_id"][i]), int(batch["pid"][i]))
            actor = self.actors.setdefault(key, {
                "node_id": key[0], "node_ip": str(batch["node_ip"][i]), "pid": key[1],
                "device": str(batch["device"][i]), "rows": 0})
            actor["rows"] += rows
        self.timeline.append([round(self.elapsed(), 3), self.rows])

    def finish(self, summary) -> None:
        summary.seconds = self.elapsed()
        summary.images_per_second = self.rows / summary.seconds if summary.seconds else 0.0
        summary.stage_seconds = {k: round(v, 4) for k, v in self.seconds.items()}
        summary.stage_ms_per_image = {
            k: round(1000 * v / max(self.rows, 1), 4) for k, v in self.seconds.items()
        }
        summary.parts = self.parts
        summary.actors = list(self.actors.values())
        step = max(1, len(self.timeline) // TIMELINE_POINTS)
        summary.timeline = self.timeline[::step] + ([self.timeline[-1]] if step > 1 else [])
        summary.timeline.append([round(summary.seconds, 3), self.rows])


class Watch:
    """Turns what the records and the cluster show into events for the user, once each."""

    NODE_CHECK_SECONDS = 5.0

    def __init__(self, observer: Observer, cluster):
        self.observer = observer
        self.alive = {n.node_id: n.ip for n in cluster.nodes}
        self.checked = time.monotonic()
        self.seen: set[tuple[str, int]] = set()

    def records(self, batch: dict[str, np.ndarray]) -> None:
        for i in range(len(batch["part"])):
            actor = (str(batch["node_id"][i]), int(batch["pid"][i]))
            if actor not in self.seen:
                self.seen.add(actor)
                if bool(batch["restarted"][i]):
                    self.observer.event(
                        f"an inference actor's process on node {batch['node_ip'][i]} died and "
                        "was replaced; Ray retried the blocks it held (no row is lost or "
                        "written twice)")
            crashed = json.loads(batch["kinds"][i]).get("decode_crash")
            for path in (crashed or {}).get("examples", []):
                self.observer.event(
                    f"reading or decoding {path} killed or hung the decoding process twice: it "
                    "is an error row (decode_crash), and Ray decoded the other inputs of its "
                    "task again")
            if bool(batch["isolated"][i]):
                self.observer.event(
                    f"a block killed an inference process; it was run again one image at a "
                    f"time to find the image that does ({batch['rows'][i]} rows in "
                    f"{batch['part'][i]})")
        if time.monotonic() - self.checked > self.NODE_CHECK_SECONDS:
            self.checked = time.monotonic()
            self._nodes()

    def _nodes(self) -> None:
        import ray

        now = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n["Alive"]}
        for node, ip in self.alive.items():
            if node not in now:
                self.observer.event(f"node {ip} left the cluster; Ray redoes its work on the "
                                    "nodes that remain")
        for node, ip in now.items():
            if node not in self.alive:
                self.observer.event(f"node {ip} joined the cluster")
        self.alive = now


