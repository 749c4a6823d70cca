"""Images that kill the inference process: found across restarts, written as error rows.

A model can fail on one image without raising: a segfault in a native kernel, an abort, the
out-of-memory killer. Ray restarts the actor and retries the batch, which kills it again, for
ever. :meth:`BatchRunner.run_isolating` cannot help (its process is gone), so the evidence must
outlive the process: it is kept in Ray's GCS key-value store (where Ray Serve keeps its state),
under the actor's id, which a restarted actor keeps.

Cost: nothing until an actor has been restarted. A restarted actor does not know which batch
killed its predecessor, so from then on it records each batch before running it (one GCS round
trip, well under a millisecond on a LAN). When a later incarnation receives the batch its
predecessor was running, it runs that batch one image at a time, recording each image first.
An image that was running when the process died twice is the culprit and becomes an error row
(twice, so that one unrelated kill, e.g. a lost node, does not condemn an innocent image). A
batch holding k such images costs 2k + 2 restarts; its other images are predicted as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

NAMESPACE = "batch-infer"
STRIKES = 2
DIED = "the inference process died while predicting this image ({n} times): the model crashes on it"


class CrashGuard:
    """Wraps ``run_isolating`` in an actor with a record that survives the actor's process."""

    def __init__(self, run_id: str):
        import ray

        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # it reads a deprecated property of Ray's own
            warnings.simplefilter("ignore")
            reborn = bool(ctx.was_current_actor_reconstructed)
        self.key = f"{run_id}/{ctx.get_actor_id()}"
        self.recording = reborn
        # What the previous incarnation was running when it died (None: nothing recorded).
        self.last = _get(self.key) if reborn else None
        if reborn:
            log.warning("Inference actor restarted; it died running %s", self.last or "?")

    def run(self, runner, images: np.ndarray, paths) -> tuple[np.ndarray, list[str | None]]:
        """``runner.run_isolating(images)``, surviving images that kill the process."""
        if not self.recording:
            return runner.run_isolating(images)
        batch = _digest(paths)
        if self.last is not None and self.last["batch"] == batch:
            last, self.last = self.last, None
            return self._one_at_a_time(runner, images, batch, last)
        _put(self.key, {"batch": batch, "row": None, "strikes": {}})
        return runner.run_isolating(images)

    def _one_at_a_time(self, runner, images: np.ndarray, batch: str, last: dict):
        strikes = {int(i): n for i, n in last["strikes"].items()}
        if last["row"] is not None:  # the image that was running when the process died
            strikes[last["row"]] = strikes.get(last["row"], 0) + 1
        log.warning("This batch killed an inference process; running it one image at a time")
        out = np.zeros((len(images), runner.out_dim), np.float32)  # (n, D)
        errors: list[str | None] = [None] * len(images)
        for i in range(len(images)):
            if strikes.get(i, 0) >= STRIKES:
                errors[i] = DIED.format(n=strikes[i])
                continue
            _put(self.key, {"batch": batch, "row": i, "strikes": strikes})
            row_out, (errors[i],) = runner.run_isolating(images[i : i + 1])
            out[i] = row_out[0]
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
