"""End to end: every contestant on the same files, each in its own process, interleaved.

Each run is ``python -m pipeline.bench --contestant NAME IMAGES OUTPUT SETUP_JSON``; we
sample the peak resident memory of its whole process tree (Ray's workers included) from
/proc, take medians over ``repeats``, and check that the contestants' top-1 labels agree
with the loop's (the same model on the same images must say the same thing).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import answers
from pipeline.bench.contestants import CONTESTANTS
from pipeline.bench.gpu import spawning
from pipeline.bench.workload import Setup, make_images

KEYS = ("images_per_second", "seconds", "init_seconds", "data_start_seconds", "peak_rss_mb")


class TreeMemory:
    """Peak summed RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)


def tree_rss(root: int) -> int:
    """Summed RSS in bytes of ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_contestant(name: str, images: Path, work: Path, setup: Setup) -> dict:
    """One contestant in a fresh process; its result plus peak memory and images/s."""
    out = work / f"out_{name}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "pipeline.bench", "--contestant", name, str(images), str(out),
           setup.to_json()]
    with spawning():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    peak = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"bench contestant '{name}' failed (exit {proc.returncode}): "
                           f"{stderr.strip()[-2000:]}")
    return measured(json.loads(stdout.strip().splitlines()[-1]), peak)


def measured(result: dict, peak_bytes: int) -> dict:
    """A contestant's result with its images/s and its process tree's peak memory."""
    return {**result, "peak_rss_mb": peak_bytes / 2**20,
            "images_per_second": result["images"] / result["seconds"]}


def end_to_end(setup: Setup, count: int, repeats: int, work: Path,
               contestants: tuple[str, ...] = CONTESTANTS) -> dict:
    """Medians over ``repeats`` interleaved runs of each contestant on ``count`` images."""
    images = make_images(setup, work, count)
    runs: dict[str, list[dict]] = {c: [] for c in contestants}
    for _ in range(repeats):
        for name in contestants:  # interleaved, so drifts in machine load hit all alike
            runs[name].append(run_contestant(name, images, work, setup))
    return summarise(runs, setup, work)


def summarise(runs: dict[str, list[dict]], setup: Setup, work: Path) -> dict:
    """Medians, ratios and label agreement of contestants' runs (outputs in work/out_NAME)."""
    med = {name: {key: statistics.median(r[key] for r in rs) for key in KEYS}
           for name, rs in runs.items()}
    for name, rs in runs.items():  # as if Ray Data's per-cluster actors started in the run
        med[name]["first_job_images_per_second"] = statistics.median(
            r["images"] / (r["seconds"] + r["data_start_seconds"]) for r in rs)
    first = next(iter(runs.values()))
    result = {"images": first[0]["images"], "repeats": len(first), "workload": setup.workload,
              "image_size": list(setup.image_size), "device_batch": setup.device_batch,
              "median": med, "runs": runs}
    if "pipeline" in runs:
        ours = med["pipeline"]
        firsts = [r["first_result_seconds"] for r in runs["pipeline"]
                  if r.get("first_result_seconds")]
        ours["first_result_seconds"] = statistics.median(firsts) if firsts else None
        ours["stage_ms_per_image"] = runs["pipeline"][-1].get("stage_ms_per_image")
        result["pipeline_device_batch"] = runs["pipeline"][-1]["plan"].get("device_batch_size")
        for other in ("loop", "ray_recipe"):
            if other in med:
                result[f"ratio_vs_{other}"] = (ours["images_per_second"]
                                               / med[other]["images_per_second"])
        if "loop" in med:
            result["first_job_ratio_vs_loop"] = (ours["first_job_images_per_second"]
                                                 / med["loop"]["images_per_second"])
    if "loop" in runs:
        result["agreement_vs_loop"] = {
            name: agreement(work / "out_loop", work / f"out_{name}")
            for name in runs if name != "loop"}
    return result


def answers_by_name(output: Path) -> dict[str, Any]:
    """File name -> answer of a contestant's output: its top-1 label, or its embedding as a
    float array (None on an error row)."""
    import pyarrow.parquet as pq

    column = "label" if "label" in pq.read_schema(_a_part(output)).names else "embedding"
    table = pq.read_table(output, columns=["path", column])
    values = table.column(column).to_pylist()
    if column == "embedding":
        values = [None if v is None else np.asarray(v, np.float32) for v in values]
    return {os.path.basename(p): v for p, v in zip(table.column("path").to_pylist(), values)}


def agreement(reference: Path, other: Path) -> float:
    """Fraction of the reference's images to which ``other`` gave the same answer (same
    top-1 label, or an embedding within ``answers.SAME_COSINE``; missing: not)."""
    ref, got = answers_by_name(reference), answers_by_name(other)
    same = 0
    for name, answer in ref.items():
        theirs = got.get(name)
        if answer is None or theirs is None:
            same += answer is None and theirs is None and name in got
        elif isinstance(answer, np.ndarray):
            same += bool(answers.agree(answer[None], theirs[None])[0])
        else:
            same += answer == theirs
    return same / max(len(ref), 1)


def _a_part(output: Path) -> Path:
    return next(p for p in sorted(Path(output).rglob("*.parquet")) if not p.name.startswith("_"))


def memory_scaling(setup: Setup, count: int, factor: int, work: Path) -> dict:
    """Peak memory of the pipeline on ``count`` images and on ``factor`` times as many."""
    small = run_contestant("pipeline", make_images(setup, work, count), work, setup)
    scaled = make_images(setup, work, count * factor)
    large = run_contestant("pipeline", scaled, work, setup)
    return {"images": count, "factor": factor,
            "peak_rss_mb": small["peak_rss_mb"], "scaled_peak_rss_mb": large["peak_rss_mb"],
            "ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
            "images_per_second": small["images_per_second"],
            "scaled_images_per_second": large["images_per_second"]}
