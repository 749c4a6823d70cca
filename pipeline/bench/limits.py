"""What this machine can do at best, from two costs measured apart, and the pipeline's share.

* ``decode_ms``: one core's cost to read and decode one of the workload's files (the
  pipeline's own ``decode_image``, one process, median over repeats);
* ``model_ms``: the compiled model's cost per image at the plan's device batch, in one
  process, which XLA:CPU runs on every core (or the rate of one GPU).

**CPU.** Decode is one process per core; the model, while it runs, takes all C cores. In
steady state each image needs ``decode_ms`` of one core and ``model_ms`` of all of them, so
C cores finish at most ``C / (decode_ms + C * model_ms)`` images per ms. Example (RESEARCH.md,
480x360 photos to a 160x160 CNN on 2 cores): 2 / (0.81 + 2 x 1.07) ms = 678 images/s.

**GPU.** Decode runs on the cores the GPU actors leave (``decode_cores``) while the GPUs
compute, so the limit is the slower of the two: ``min(decode_cores / decode_ms, GPU rate)``
(the rate measured on one GPU, times the GPUs).

No pipeline reaches the limit (Ray's scheduling, transfers, writing the results); the
fraction says how much of it is left on the table.
"""

from __future__ import annotations


def cpu_limit(cores: float, decode_ms: float, model_ms: float) -> float:
    """Images per second at best on ``cores`` CPU cores."""
    return 1000 * cores / (decode_ms + cores * model_ms)


def gpu_limit(decode_cores: float, decode_ms: float, gpu_images_per_second: float) -> float:
    """Images per second at best: decode on ``decode_cores`` or the GPUs, the slower."""
    return min(1000 * decode_cores / decode_ms, gpu_images_per_second)


def limits(*, cores: int, decode_ms: float, model_ms: float, gpus: int = 0,
           decode_cores: float | None = None) -> dict:
    """The limit and its parts. ``model_ms``: per image on one device (all CPU cores, or one
    GPU); ``decode_cores``: cores left for decoding on a GPU node (default: all)."""
    if gpus:
        decode_cores = cores if decode_cores is None else decode_cores
        gpu_rate = gpus * 1000 / model_ms
        decode_rate = 1000 * decode_cores / decode_ms
        best = gpu_limit(decode_cores, decode_ms, gpu_rate)
        formula = (f"min({decode_cores:g} cores / {decode_ms:.3g} ms, {gpus} GPU x "
                   f"{1000 / model_ms:,.0f} images/s)")
        bound = "decode" if decode_rate < gpu_rate else "model"
    else:
        decode_cores = cores
        best = cpu_limit(cores, decode_ms, model_ms)
        formula = f"{cores} / ({decode_ms:.3g} + {cores} x {model_ms:.3g}) ms"
        bound = "decode" if decode_ms > cores * model_ms else "model"
    return {"cores": cores, "decode_cores": decode_cores, "gpus": gpus,
            "decode_ms_per_image": decode_ms, "model_ms_per_image": model_ms,
            "limit_images_per_second": best, "bound": bound, "formula": formula}


def fraction(images_per_second: float, limit: dict) -> float:
    """The share of the machine's limit a contestant reached."""
    return images_per_second / limit["limit_images_per_second"]
