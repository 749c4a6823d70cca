"""Train the bundled digits CNN (``batch-infer train``).

Trains only on the first 1,500 digits. Each digit is rendered the ways users render digits
(16-128 px, several resamplers, margins, small shifts and rotations, blur, PNG or JPEG, gray
or RGB), encoded, and decoded by the pipeline's own :func:`pipeline.decode.decode_image`, so
training sees exactly the pixels inference will see.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline import digits
from pipeline.decode import decode_image
from pipeline.models import digits_cnn

log = logging.getLogger(__name__)

WEIGHT_DECAY = 0.05  # decoupled (AdamW)
EMA_DECAY = 0.999


def augment(values: np.ndarray, rng: np.random.Generator, plain: bool) -> Image.Image:
    """One rendering of an 8x8 digit; ``plain`` renders it edge to edge, as sample-data does."""
    size = int(rng.integers(16, 129))
    resample = str(rng.choice(list(digits.RESAMPLERS)))
    if plain:
        return digits.render(values, size, resample, rgb=bool(rng.integers(2)))
    margin = rng.uniform(0.0, 0.2, size=4)  # left, top, right, bottom, as a fraction of size
    width = max(4, int(size * (1 - margin[0] - margin[2])))
    height = max(4, int(size * (1 - margin[1] - margin[3]) * rng.uniform(0.85, 1.15)))
    ink = Image.fromarray(digits.to_gray(values), "L").resize((width, height), digits.RESAMPLERS[resample])
    ink = ink.rotate(float(rng.uniform(-12, 12)), Image.Resampling.BILINEAR, expand=True, fillcolor=255)
    canvas = Image.new("L", (size, size), 255)
    canvas.paste(ink, (int(size * margin[0]), int(size * margin[1])))
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.2)) * size / 32))
    return canvas.convert("RGB") if rng.integers(2) else canvas


def make_dataset(x: np.ndarray, y: np.ndarray, copies: int, seed: int, spec) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` renderings of each digit, through encode + the pipeline's decode."""
    rng = np.random.default_rng(seed)
    images = np.zeros((len(x) * copies, *spec.shape), np.uint8)  # (N, H, W, C)
    labels = np.repeat(y, copies)
    for i in range(len(images)):
        img = augment(x[i // copies], rng, plain=i % copies < copies // 2)
        fmt = "JPEG" if rng.random() < 0.5 else "PNG"
        data = digits.encode(img, fmt, quality=int(rng.integers(40, 96)))
        images[i] = decode_image(data, spec)
    return images, labels


def train(
    output: str | Path, epochs: int = 16, copies: int = 16, seed: int = 0,
    config: digits_cnn.CNNConfig | None = None,
) -> dict:
    """Train for ``epochs`` passes over ``copies`` renderings of each training digit and save the
    checkpoint to ``output``; returns metrics. Deterministic for a seed, whatever the machine load."""
    import jax
    import jax.numpy as jnp

    config = config or digits_cnn.CNNConfig()
    spec = _spec(config)
    (x_train, y_train), (x_test, y_test) = digits.load_split()
    t0 = time.perf_counter()
    images, labels = make_dataset(x_train, y_train, copies, seed, spec)
    test_images, _ = make_dataset(x_test, y_test, 1, seed + 1, spec)
    log.info("rendered %d training images in %.1fs", len(images), time.perf_counter() - t0)

    apply = digits_cnn.make_apply(config)
    params = {k: jnp.asarray(v) for k, v in digits_cnn.init_params(config, seed).items()}
    opt = _adam_init(params)
    ema = params

    def loss_fn(p, xb, yb):
        logits = apply(p, xb.astype(jnp.float32) / 255.0)
        # Label smoothing 0.1: the 1,500 digits are few; confident fits do not generalise.
        target = jax.nn.one_hot(yb, config.num_classes) * 0.9 + 0.1 / config.num_classes
        return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=1))

    @jax.jit
    def step(p, o, ema, xb, yb, lr, shift):
        xb = jnp.roll(xb, shift, axis=(1, 2))  # +-2 px jitter on top of the rendered shifts
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        p, o = _adam_update(p, o, grads, lr, weight_decay=WEIGHT_DECAY)
        # The shipped weights are an exponential moving average of the last ~1,000 steps.
        ema = jax.tree_util.tree_map(lambda e, q: EMA_DECAY * e + (1 - EMA_DECAY) * q, ema, p)
        return p, o, ema, loss

    rng = np.random.default_rng(seed)
    batch = 64
    steps_per_epoch = len(images) // batch
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        for i in range(steps_per_epoch):
            done = epoch * steps_per_epoch + i
            lr = 2e-3 * 0.5 * (1 + np.cos(np.pi * done / total))  # cosine decay to zero
            idx = order[i * batch : (i + 1) * batch]
            shift = tuple(int(v) for v in rng.integers(-2, 3, size=2))
            params, opt, ema, loss = step(params, opt, ema, images[idx], labels[idx], lr, shift)
        log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, float(loss))
    params = {k: np.asarray(v) for k, v in ema.items()}
    logits = np.asarray(apply(params, test_images.astype(np.float32) / 255.0))
    accuracy = float((logits.argmax(1) == y_test).mean())
    metrics = {"epochs": epochs, "seed": seed, "train_images": len(images), "heldout_accuracy": round(accuracy, 4),
               "trained_on": f"sklearn digits [0:{digits.TRAIN_COUNT}]"}
    digits_cnn.save(output, config, params, [str(i) for i in range(10)], training=metrics)
    return metrics


def _spec(config):
    from pipeline.model import ModelSpec

    return ModelSpec(height=config.height, width=config.width, channels=config.channels,
                     class_names=tuple(str(i) for i in range(config.num_classes)))


def _adam_init(params):
    import jax

    zeros = jax.tree_util.tree_map(lambda p: p * 0, params)
    return {"m": zeros, "v": zeros, "t": 0}


def _adam_update(params, opt, grads, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    import jax
    import jax.numpy as jnp

    t = opt["t"] + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["v"], grads)
    scale = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
    params = jax.tree_util.tree_map(
        lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps) - lr * weight_decay * p, params, m, v
    )
    return params, {"m": m, "v": v, "t": t}
