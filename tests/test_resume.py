"""A killed driver, then ``--resume``: every input gets exactly one row, rows already committed
are not computed again, half-written files are never seen as results, and nothing is written
outside the output directory.

The driver is the real ``batch-infer run`` in a subprocess with its own local Ray (kept in a
private ``RAY_TMPDIR``, so it joins no other Ray on this machine and all of its processes can
be found and killed). The model is ``tests/poison_model.py`` without faults: it records every
call, so the test can count the images the model saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import duckdb
import numpy as np
import poison_model
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from driver import Driver

import pipeline
from pipeline import manifest
from pipeline.config import RunConfig
from pipeline.digits import write_samples
from pipeline.model import load_model
from pipeline.source import Source
from pipeline.write import OutputDir, OutputError, WriteFailure, part_name

IMAGES = 200
BATCH = 8


def committed_rows(out: Path) -> list[str]:
    """Paths in the committed parts, after checking that every file a reader would pick up
    (pyarrow's directory read, DuckDB's '*.parquet' glob) reads in full."""
    parts = sorted(out.glob("*.parquet"))
    assert all(p.name.startswith("part-") for p in parts), [p.name for p in parts]
    paths = [row for p in parts for row in pq.read_table(p).column("path").to_pylist()]
    if parts:
        assert pq.read_table(out).num_rows == len(paths)
        count = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
        assert count == len(paths)
    assert len(paths) == len(set(paths)), "a row was committed twice"
    return paths


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every file and directory under ``root`` except ``skip``: size, mtime and content hash."""
    seen = {}
    for p in sorted(root.rglob("*")):
        if p == skip or skip in p.parents:
            continue
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        seen[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


@pytest.mark.slow
def test_killed_driver_resumes_exactly_once_and_writes_only_its_output(tmp_path):
    """Writes only its output: the runs get a HOME and a TMPDIR of their own; afterwards
    HOME holds only the documented compilation cache (~/.cache/batch-infer/xla, private to
    the user) and the auth token Ray itself writes when it starts a local cluster
    (~/.ray/auth_token), and TMPDIR nothing. Rules out a run that leaves files anywhere else:
    scratch files in the temporary directory, a cache or log in an undocumented place, a
    change to its inputs or working directory."""
    sandbox = tmp_path / "sandbox"  # what the run may read but must not change
    src, out, cwd = sandbox / "images", sandbox / "out", sandbox / "cwd"
    cwd.mkdir(parents=True)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp)}
    write_samples(src, IMAGES, seed=5)
    calls = tmp_path / "calls"  # the test model's own record, outside the sandbox
    # 0.3 s per model call: 25 calls, so the kill below lands seconds before the run's end.
    options = poison_model.write_options(tmp_path / "model.json", calls=str(calls), delay=0.3)
    run = ["run", "--input", src, "--output", out, "--model-fn", "poison_model:build",
           "--model", options, "--batch-size", BATCH, "--rows-per-file", 16, "--actors", 1,
           "--no-progress"]
    before = snapshot(sandbox, skip=out)

    # 1. Killed after the manifest is written, before any row is committed.
    driver = Driver(run, cwd, env=env)
    driver.wait_until(lambda: (out / "_manifest.json").exists(), "the manifest")
    driver.kill()
    assert committed_rows(out) == []

    # 2. Resumed, and killed again once some part files are committed.
    driver = Driver([*run, "--resume"], cwd, env=env)
    driver.wait_until(lambda: len(list(out.glob("part-*.parquet"))) >= 2, "two part files")
    driver.kill()
    done = committed_rows(out)
    assert len(done) < IMAGES, "the kill landed after every row was committed: more work needed"
    assert len(done) >= 32
    calls.rename(tmp_path / "calls_before")

    # 3. Resumed to the end: only the rest is computed.
    result = Driver([*run, "--resume"], cwd, env=env).wait()
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(out).to_pylist()
    assert sorted(committed_rows(out)) == sorted(str(p) for p in src.rglob("*.*"))
    assert all(r["status"] == "ok" for r in rows)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["completed"] and summary["rows_resumed"] == len(done)
    assert summary["rows_ok"] == IMAGES
    seen = poison_model.read_calls(calls)
    assert sum(c.images for c in seen) == IMAGES - len(done)  # committed rows were not redone
    assert len(seen) < IMAGES / BATCH  # fewer model calls than a full run makes
    assert f"{len(done)} from an earlier run" in result.stdout
    # (Resuming a finished run computes nothing: tests/test_pipeline.py, in one process.)

    # Nothing outside the output changed; inside it, only our own files.
    assert snapshot(sandbox, skip=out) == before
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if not n.startswith("part-")] == [
        "_listing.arrow", "_manifest.json", "_report.html", "_summary.json"]
    assert all(n.endswith(".parquet") for n in names if n.startswith("part-"))
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.is_dir())
    cache = [p for p in written if p.startswith(".cache/batch-infer/xla/")]
    assert cache, f"no compilation cache under HOME: was HOME used at all? {written}"
    assert (home / ".cache/batch-infer/xla").stat().st_mode & 0o077 == 0  # private
    assert sorted(set(written) - set(cache)) in ([], [".ray/auth_token"]), written
    # Only the listening sockets of multiprocessing's fork server (Ray's dashboard starts one),
    # which this test's SIGKILL of a killed run's Ray leaves no time to remove.
    left = [str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.is_dir()]
    assert all(re.fullmatch(r"pymp-\w+/listener-\w+", f) and (tmp / f).is_socket()
               for f in left), left


def test_resume_refuses_another_model_listing_or_options(ray_local, tmp_path):
    src, out = tmp_path / "images", tmp_path / "out"
    write_samples(src, 6, seed=2)
    pipeline.run(str(src), str(out), progress=False)
    with pytest.raises(OutputError, match=r"its rows were made by model \w+, this run uses \w+"):
        pipeline.run(str(src), str(out), resume=True, model_fn="poison_model:build")
    with pytest.raises(OutputError, match=r"top_k=5, this run asks for top_k=3"):
        pipeline.run(str(src), str(out), resume=True, top_k=3)
    shutil.copy(next(src.rglob("*.png")), src / "new.png")
    with pytest.raises(OutputError, match=r"input listing changed .*6 inputs then, 7 now"):
        pipeline.run(str(src), str(out), resume=True)
    (src / "new.png").unlink()
    manifest = (out / "_manifest.json").read_text()
    # Parts whose manifest is damaged or gone: what made them is unknown, so not mixed in.
    for damage, why in ((lambda m: m.write_text(manifest[:40]), "is not valid JSON"),
                        (lambda m: m.write_text("[]"), "holds no manifest"),
                        (lambda m: m.unlink(), "holds part files but no _manifest.json")):
        damage(out / "_manifest.json")
        with pytest.raises(OutputError, match=f"Cannot resume into '{out}': .*{why}.*--overwrite"):
            pipeline.run(str(src), str(out), resume=True)
    assert pq.read_table(out).num_rows == 6  # refused before touching anything


def test_resume_refusal_through_the_cli(tmp_path):
    """The user sees one line naming both models and exit status 2, before any Ray starts:
    the run's private Ray directory never gets a session and no Ray process is left. Rules
    out checks that run only after Ray has started (seconds of start-up for a typo)."""
    src, out = tmp_path / "images", tmp_path / "out"
    write_samples(src, 3, seed=2)
    cfg = RunConfig(input=str(src), output=str(out))
    bundled = load_model()
    source = Source.of(cfg)
    listing = source.list(cfg.input, cfg.output)
    manifest.prepare(OutputDir(str(out)), cfg, listing, bundled, source)  # as a run begins
    options = poison_model.write_options(tmp_path / "model.json")
    driver = Driver(["run", "--input", src, "--output", out, "--resume",
                     "--model-fn", "poison_model:build", "--model", options], tmp_path)
    result = driver.wait(120)
    assert result.returncode == 2
    assert not driver.ray_started and driver.ray_pids == [], "Ray started before the refusal"
    other = pipeline.load_model(options, "poison_model:build").fingerprint
    assert result.stderr.strip().splitlines()[-1] == (
        f"batch-infer: error: Cannot resume into '{out}': its rows were made by model "
        f"{bundled.fingerprint}, this run uses {other} (the computation differs: apply, or a "
        "function it calls, changed). Use --overwrite to start again.")


def test_half_written_part_is_never_read_and_is_cleaned_up(tmp_path):
    """A part whose rename never happened (its writer was killed) stays a ``_tmp-`` file that
    no reader picks up, and the next run removes it; a write that fails cleans up itself."""
    out_dir = tmp_path / "out"
    out = OutputDir(str(out_dir))
    table = pa.table({"path": ["a.png", "b.png"]})
    out.commit_table("part-00000-aaaa.parquet", table)
    blocker = out_dir / "part-00001-aaaa.parquet"
    blocker.mkdir()  # the rename onto it fails
    (blocker / "x").touch()
    with pytest.raises(WriteFailure, match=r"cannot write part-00001-aaaa.parquet in '.*out'"):
        out.commit_table("part-00001-aaaa.parquet", table)
    assert not list(out_dir.glob("_tmp-*"))  # the failed write removed its temporary
    assert out.parts() == ["part-00000-aaaa.parquet"]  # a directory is no part
    shutil.rmtree(blocker)
    killed = out_dir / "_tmp-part-00001-aaaa.parquet.0c3c"  # what a killed writer leaves
    pq.write_table(table.slice(0, 1), killed)
    assert committed_rows(out_dir) == ["a.png", "b.png"]
    out.remove_temporaries()  # what a run does once its writers are done
    assert not killed.exists()


def test_a_part_that_cannot_be_written_stops_the_run_and_resume_finishes_it(
        ray_local, tmp_path, capsys):
    """A write that fails in an actor (a full disk, a refused upload; here a directory where
    the part must go) ends the run with one line, exit 1; the rows written stay, and so do
    the listing and manifest, whatever the actors still had in hand, so --resume finishes."""
    from pipeline.cli import main

    src = tmp_path / "in"
    write_samples(src, 12, seed=5)
    paths = sorted(str(p) for p in src.rglob("*.*"))
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = tmp_path / "out"
    blocked = out / part_name(np.array([7]), [paths[7]])  # one row a part: its name is known
    (blocked / "x").mkdir(parents=True)
    args = ["run", "--input", str(listing), "--input-list", "--output", str(out),
            "--rows-per-file", "1", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"batch-infer: run failed: cannot write {blocked.name} in '{out}'")
    assert err[-1].endswith("Rows already written are kept: fix that, then run again with "
                            "--resume"), err[-1]
    assert (out / "_manifest.json").exists() and (out / "_listing.arrow").exists()
    shutil.rmtree(blocked)
    written = committed_rows(out)
    assert paths[7] not in written and len(written) < 12
    assert main([*args, "--resume"]) == 0
    assert sorted(committed_rows(out)) == paths


def test_a_plan_the_cluster_cannot_run_leaves_no_trace(ray_local, tmp_path):
    """Refused before any actor starts: the output directory is not left behind, so the
    corrected command runs as it is (it said 'already holds results')."""
    from pipeline.plan import PlanError

    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 6, seed=2)
    with pytest.raises(PlanError, match="no node of the cluster has 1 GPU"):
        pipeline.run(str(src), str(out), gpus_per_actor=1)
    assert not out.exists()
    assert pipeline.run(str(src), str(out)).rows_ok == 6


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_resume_finishes(tmp_path):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) mid-run, and again
    while it stops (people press it twice): exit 130 with one line instead of every cut
    thread's traceback; --resume does the rest."""
    src, out = tmp_path / "images", tmp_path / "out"
    write_samples(src, IMAGES, seed=6)
    options = poison_model.write_options(tmp_path / "model.json", delay=0.3)
    run = ["run", "--input", src, "--output", out, "--model-fn", "poison_model:build",
           "--model", options, "--batch-size", BATCH, "--rows-per-file", 16, "--actors", 1,
           "--no-progress"]
    driver = Driver(run)
    driver.wait_until(lambda: list(out.glob("part-*.parquet")), "a part file")
    os.killpg(driver.proc.pid, signal.SIGINT)
    time.sleep(0.5)  # stopping Ray Data's execution, or Ray itself
    with contextlib.suppress(ProcessLookupError):  # unless it is already done
        os.killpg(driver.proc.pid, signal.SIGINT)
    result = driver.wait(120)
    assert result.returncode == 130, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    line = ("batch-infer: interrupted: rows already written are kept; run again with "
            "--resume to finish")
    assert result.stderr.strip().splitlines() == [line], result.stderr[-3000:]
    done = committed_rows(out)
    assert 0 < len(done) < IMAGES
    result = Driver([*run, "--resume"]).wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(committed_rows(out)) == sorted(str(p) for p in src.rglob("*.*"))


def test_an_unreadable_part_is_set_aside_and_its_rows_redone(ray_local, tmp_path):
    """A part cut short (a disk error, a copy gone wrong, a partial upload of an older
    version): --resume renames it where no reader looks and computes its rows again, instead
    of failing on Parquet's 'magic bytes not found'."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 40, seed=8)
    pipeline.run(str(src), str(out), rows_per_file=16)
    damaged = sorted(out.glob("part-*.parquet"))[1]
    rows = pq.read_metadata(damaged).num_rows
    damaged.write_bytes(damaged.read_bytes()[:-200])
    again = pipeline.run(str(src), str(out), rows_per_file=16, resume=True)
    assert again.rows_resumed == 40 - rows and again.rows_ok == 40
    assert sorted(committed_rows(out)) == sorted(str(p) for p in src.rglob("*.*"))
    assert (out / f"_{damaged.name}.unreadable").exists()  # kept for a look, read by no one
    pipeline.run(str(src), str(out), overwrite=True)
    assert not list(out.glob("*.unreadable"))


def test_a_second_run_into_an_output_in_use_is_refused(ray_local, tmp_path):
    """Two runs into one output (the same command in two terminals, an overlapping cron job)
    would mix their rows: the second is refused while the first holds the output."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_samples(src, 6, seed=9)
    out.mkdir()
    first = OutputDir(str(out)).lock()  # what a run holds while it runs
    with pytest.raises(OutputError, match=f"Output '{out}' is being written by another run"):
        pipeline.run(str(src), str(out))
    assert list(out.iterdir()) == []  # the refused run left nothing, not even its listing
    (out / "part-00000-00006-ab.parquet").write_bytes(b"the first run's")
    with pytest.raises(OutputError, match="being written by another run"):
        pipeline.run(str(src), str(out), overwrite=True)  # must not clear the first run's parts
    assert [p.name for p in out.iterdir()] == ["part-00000-00006-ab.parquet"]
    (out / "part-00000-00006-ab.parquet").unlink()
    first.release()
    assert pipeline.run(str(src), str(out)).rows_ok == 6
    assert pipeline.run(str(src), str(out), overwrite=True).rows_ok == 6  # released at the end
