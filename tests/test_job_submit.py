"""A real Ray Job: `ray start --head` on loopback, `ray job submit --working-dir .`, logs, output.

The head runs in its own process group with its own ports, temp dir and auth token, and the
test stops only that head (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import label_of

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with its dashboard on 127.0.0.1, started in another directory than the
    tests'; yields (dashboard URL, client env: RAY_ADDRESS is the head's GCS)."""
    pytest.importorskip("aiohttp", reason="the Ray Jobs server needs ray[default]")
    tmp = tmp_path_factory.mktemp("head")
    env = dict(os.environ)
    env.update(
        # Ray 2.60 turns token auth on for new clusters: give head and client the same token
        # explicitly instead of relying on (or writing) ~/.ray/auth_token.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=uuid.uuid4().hex,
        RAY_USAGE_STATS_ENABLED="0",
        # On SIGTERM a head first drains for 30 s; nothing here needs draining.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    dashboard, gcs = _free_port(), _free_port()
    cmd = [
        *RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
        "--num-cpus=2", "--object-store-memory=200000000", f"--temp-dir={tmp / 'ray'}",
    ]
    url = f"http://127.0.0.1:{dashboard}"
    with open(tmp / "head.log", "wb") as log:
        head = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
        )
        try:
            _wait_for_dashboard(url, head, tmp / "head.log")
            yield url, {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        finally:
            _stop(head)


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without the token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {url} not up after {timeout}s:\n{log.read_text()}")


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it stops the processes it started), then kill its group."""
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()


def _ray_job(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RAY, "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def _job_status(env: dict, url: str, job_id: str) -> str:
    """The job's status from the Jobs REST API, with the head's token."""
    request = urllib.request.Request(
        f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["status"]


def test_submit_job_writes_parquet(ray_head, sample_dir, tmp_path):
    url, env = ray_head
    out = tmp_path / "predictions"
    job_id = f"batch-infer-test-{uuid.uuid4().hex[:8]}"
    submit = _ray_job(
        env, "submit", "--address", url, "--submission-id", job_id, "--working-dir", ".", "--",
        "python", "jobs/batch_infer.py", "--input", str(sample_dir), "--output", str(out),
        "--rows-per-file", "25",
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert _job_status(env, url, job_id) == "SUCCEEDED"
    with pytest.raises(urllib.error.HTTPError, match="401"):  # the head really wants the token
        urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10)
    logs = _ray_job(env, "logs", "--address", url, job_id).stdout
    assert "rows: 40 (40 ok, 0 error)" in logs
    # The driver imported the copy of `pipeline` Ray shipped with --working-dir.
    shipped = next(line for line in logs.splitlines() if "pipeline package at" in line)
    assert "working_dir_files" in shipped and str(REPO) not in shipped
    table = pq.read_table(out)
    parts = list(out.glob("part-*.parquet"))
    assert table.num_rows == 40 and all(pq.read_metadata(p).num_rows <= 25 for p in parts)
    rows = table.to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert sum(r["label_name"] == label_of(r["path"]) for r in rows) >= 38


def test_job_with_bad_input_fails_with_one_line(ray_head, tmp_path):
    url, env = ray_head
    job_id = f"batch-infer-test-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "no-such-dir"
    submit = _ray_job(
        env, "submit", "--address", url, "--submission-id", job_id, "--working-dir", ".", "--",
        "python", "jobs/batch_infer.py", "--input", str(missing), "--output", str(tmp_path / "o"),
    )
    assert submit.returncode != 0
    assert _job_status(env, url, job_id) == "FAILED"
    logs = _ray_job(env, "logs", "--address", url, job_id).stdout
    assert f"batch_infer job: error: Input '{missing}' does not exist." in logs
    assert "Traceback" not in logs


def test_a_run_that_joins_a_head_reads_and_writes_its_relative_paths(ray_head, tmp_path):
    """`batch-infer run` from a shell in one directory, joining a head started in another
    (RAY_ADDRESS): the head's workers resolve paths against their own directory, so relative
    paths must reach them absolute (they looked for 'out/_listing.arrow' under the head's)."""
    _, env = ray_head
    from pipeline.digits import write_samples

    write_samples(tmp_path / "images", 12, seed=7)
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--input", "images", "--output", "out",
         "--no-progress"], env=env, cwd=tmp_path, capture_output=True, text=True, check=False,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert all(r["path"].startswith(f"{tmp_path}/images/") for r in rows)
