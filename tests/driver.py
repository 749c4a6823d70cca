"""Run ``batch-infer`` in a subprocess with a local Ray of its own, and clean up after it.

Its Ray lives in a private ``RAY_TMPDIR``: it joins no other Ray on this machine (a plain
``ray.init()`` would join whatever ``ray start`` or ``Cluster()`` recorded in the shared one),
and every process it starts can be found by that variable and killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import poison_model

# As root, file permissions do not bind; without these capabilities they do, as for any user.
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def can_drop_root_file_access() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def _ctrl_c_as_from_a_shell() -> None:
    """In the child, before exec: SIGINT's default disposition, as a shell gives a foreground
    command. An ignored SIGINT is inherited across exec, and Python then installs no
    KeyboardInterrupt handler: a test of Ctrl-C would test the test process's disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    """``batch-infer`` in a subprocess with a Ray of its own."""

    def __init__(
        self, args: list, cwd: Path | None = None, drop_root_file_access: bool = False,
        env: dict[str, str] | None = None,
    ):
        """Start ``batch-infer ARGS``; tests/ is importable (``--model-fn poison_model:build``).
        ``drop_root_file_access``: as root, run without the capabilities that ignore file
        permissions (when ``setpriv`` is there). ``env``: variables to set on top of ours
        (e.g. ``HOME``, to see what a run writes there)."""
        self.ray_tmp = tempfile.mkdtemp(prefix="bi-cli-", dir="/tmp")  # short: socket paths
        self.ray_started = False  # set by cleanup(): did this driver's Ray ever start?
        self.ray_pids: list[int] = []  # set by cleanup(): the Ray processes it had to kill
        cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
        if drop_root_file_access and can_drop_root_file_access():
            cmd = DROP_DAC + cmd
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=private_ray_env(self.ray_tmp, env), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            # Runs between fork and exec; it takes no lock another thread could hold.
            preexec_fn=_ctrl_c_as_from_a_shell,  # noqa: PLW1509
        )

    def wait(self, timeout: float = 240) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.cleanup()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def wait_until(self, condition, what: str, timeout: float = 240) -> None:
        """Poll ``condition()`` until it holds; fail, naming ``what``, if the run ends first or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read()[-2000:]
                raise AssertionError(f"the run ended before {what}: {stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the driver alone, as a crash or an OOM kill would; then stop its Ray."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)
        self.cleanup()

    def cleanup(self) -> None:
        """Kill what is left of this driver's Ray (see :func:`stop_private_ray`); record
        whether it had started one at all."""
        self.ray_started = (Path(self.ray_tmp) / "ray").exists()  # Ray's session directories
        self.ray_pids += stop_private_ray(self.ray_tmp)


def private_ray_env(ray_tmp: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment for a subprocess that starts a Ray of its own in ``ray_tmp``: tests/
    importable, no RAY_ADDRESS to join, ``extra`` on top."""
    env = poison_model.worker_env()
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = ray_tmp
    env.update(extra or {})
    return env


def stop_private_ray(ray_tmp: str) -> list[int]:
    """SIGKILL every process that carries ``RAY_TMPDIR=ray_tmp`` and remove the directory;
    returns the pids killed. Ray's daemons and workers inherit the variable (workers leave the
    process group and rename themselves, so neither the group nor the command line finds them
    all; the environment does)."""
    mark = f"RAY_TMPDIR={ray_tmp}".encode()
    killed = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
        except OSError:  # gone already
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return killed
