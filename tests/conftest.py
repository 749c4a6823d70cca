"""Shared fixtures: a small loopback Ray per test module, and tiny digit images."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU Ray on 127.0.0.1 for one test module; yields its GCS address. Its workers can
    import tests/ modules (``model_fn="poison_model:build"``)."""
    import poison_model
    import ray

    ray.shutdown()
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
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


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
