"""Images that kill the inference process: found across restarts, written as error rows.

A model can fail on one image without raising: a segfault in a native kernel, an abort, the
out-of-memory killer. Ray restarts the actor and retries the batch, which kills it again, for
ever. :meth:`BatchRunner.run_isolating` cannot help (its process is gone), so the evidence must
outlive the process: it is kept in Ray's GCS key-value store (where Ray Serve keeps its state).

Cost: nothing until an actor has been restarted. A restarted actor cannot tell which of its
batches killed its predecessor, so for its first ``CAREFUL_BATCHES`` batches it records each
one before running it (two GCS round trips, under a millisecond each on a LAN). A batch found
already recorded has killed a process: its images then run one at a time, each recorded first.
An image that was running when a process died twice is the culprit and becomes an error row
(twice, so that an unrelated kill, e.g. a lost node, does not condemn an innocent image). A
batch holding k such images costs 2k + 2 restarts; the other images are predicted as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

CAREFUL_BATCHES = 16  # retried batches reach a restarted actor first; this leaves slack
NAMESPACE = "batch-infer"
STRIKES = 2
DIED = "the inference process died while predicting this image ({n} times): the model crashes on it"


class CrashGuard:
    """Wraps ``run_isolating`` in an actor with a record that survives the actor's process."""

    def __init__(self, run_id: str):
        import ray

        self.run_id = run_id
        with warnings.catch_warnings():  # it reads a deprecated property of Ray's own
            warnings.simplefilter("ignore")
            reborn = ray.get_runtime_context().was_current_actor_reconstructed
        self.careful_left = CAREFUL_BATCHES if reborn else 0
        if reborn:
            log.warning("Inference actor restarted: recording its next %d batches", CAREFUL_BATCHES)

    def run(self, runner, images: np.ndarray, paths) -> tuple[np.ndarray, list[str | None]]:
        """``runner.run_isolating(images)``, surviving images that kill the process."""
        if self.careful_left <= 0:
            return runner.run_isolating(images)
        self.careful_left -= 1
        key = f"{self.run_id}/{_digest(paths)}"
        state = _get(key)
        if state is None:  # not known to have killed anyone: record it, run it whole
            _put(key, {"row": None, "strikes": {}})
            result = runner.run_isolating(images)
            _delete(key)
            return result
        return self._one_at_a_time(runner, images, key, state)

    def _one_at_a_time(self, runner, images: np.ndarray, key: str, state: dict):
        strikes = {int(i): n for i, n in state["strikes"].items()}
        if state["row"] is not None:  # the image that was running when the process died
            strikes[state["row"]] = strikes.get(state["row"], 0) + 1
        log.warning("A batch killed an inference process before; running it one image at a time")
        out = np.zeros((len(images), runner.out_dim), np.float32)  # (n, D)
        errors: list[str | None] = [None] * len(images)
        for i in range(len(images)):
            if strikes.get(i, 0) >= STRIKES:
                errors[i] = DIED.format(n=strikes[i])
                continue
            _put(key, {"row": i, "strikes": strikes})
            row_out, (errors[i],) = runner.run_isolating(images[i : i + 1])
            out[i] = row_out[0]
        _delete(key)
        return out, errors


def forget_run(run_id: str) -> None:
    """Drop what the guards of run ``run_id`` recorded (the driver calls this at the end)."""
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_del(f"{run_id}/", del_by_prefix=True, namespace=NAMESPACE)
    except Exception as e:  # the run's own outcome matters more; the records die with Ray
        log.warning("Could not drop the crash-guard records of run %s: %s", run_id, e)


def _digest(paths) -> str:
    joined = "\0".join(map(str, paths)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(joined).hexdigest()[:32]


def _get(key: str) -> dict | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
    return json.loads(value) if value else None


def _put(key: str, state: dict) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, json.dumps(state), namespace=NAMESPACE)


def _delete(key: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=NAMESPACE)
