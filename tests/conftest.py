"""Shared fixtures: a small loopback Ray per test module, and tiny digit images."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

# Before ray is imported anywhere: keep every Ray process on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class CompileCounter:
    """Counts executables made in this process (tests assert one per actor). JAX reports
    backend_compile_duration for a load from the persistent compilation cache too."""

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = CompileCounter()


def finishes(seconds: float, run):
    """``run()`` in a thread: its result, or what it raised; fails the test if it has not
    returned after ``seconds`` (for tests whose failure would be a run that waits for ever)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = run()
        except BaseException as e:  # noqa: BLE001 - handed to the test, which re-raises it
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the run did not finish in {seconds} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU visible to JAX")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


# The address of the Ray that ray_local started and that is still up, if any.
_SHARED: dict[str, str] = {}


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU Ray on 127.0.0.1; yields its GCS address. Its workers can import tests/
    modules (``model_fn="poison_model:build"``).

    Consecutive modules share it (a start costs ~5 s on 2 cores): a module that starts a Ray
    of its own shuts this one down, and the next module that asks for it starts it again. It is
    shut down at a module's end unless every CPU is free again, so a module that leaves an
    actor or a task behind cannot slow or hang the next one."""
    import ray

    if not (ray.is_initialized() and _SHARED.get("gcs") == _gcs_address(ray)):
        _SHARED.clear()
        ray.shutdown()
        _SHARED["gcs"] = _start_ray(ray)
    yield _SHARED["gcs"]
    if ray.is_initialized() and _SHARED.get("gcs") == _gcs_address(ray) and _idle(ray):
        return
    if _SHARED.get("gcs") == _gcs_address(ray):  # ours, and busy: stop it
        ray.shutdown()
    _SHARED.clear()


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_ray():
    yield
    if _SHARED:
        import ray

        ray.shutdown()


def _start_ray(ray) -> str:
    import poison_model

    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = poison_model.worker_env()["PYTHONPATH"]  # Ray's daemons copy it
    try:
        ctx = ray.init(
            address="local",  # never join another test module's cluster on this machine
            num_cpus=2,
            object_store_memory=256 * 1024**2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = pythonpath
    return ctx.address_info["gcs_address"]


def _gcs_address(ray) -> str | None:
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address


def _idle(ray, wait: float = 10.0) -> bool:
    """Whether every CPU of this Ray is free (within ``wait`` seconds: Ray reports a
    finished actor's release a moment later)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        if ray.available_resources().get("CPU", 0) >= total > 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """40 held-out digit images, DIR/<label>/<name>.<ext>, read-only by convention."""
    from pipeline.digits import write_samples

    root = tmp_path_factory.mktemp("samples")
    write_samples(root, 40, seed=1)
    return root


def label_of(path: str) -> str:
    return Path(path).parent.name


def digit_images(count: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits decoded to the bundled model's input: ((N, 32, 32, 1) uint8, labels)."""
    from pipeline import digits
    from pipeline.model import load_model

    _, (x, y) = digits.load_split()
    return digits.model_inputs(x[:count], load_model().spec, size), y[:count]
