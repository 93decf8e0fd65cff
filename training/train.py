"""Train the shipped CIFAR-10 model: airbench's recipe, ported to Keras 3 on TensorFlow.

    python -m training.train [--data PATH] [--out models/NAME] [--epochs N] [--seed S] [--fast | --muon]

Read top to bottom: the recipe (every hyperparameter) is the dict below and is saved
with the model. The loop is a plain GradientTape loop so that the parts of airbench
that Keras' fit() cannot express (per-group learning rates, a whitening bias that
trains for 3 epochs, lookahead) are each a few visible lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from shared.settings import DEFAULT_MODEL_DIR  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.export import save_model_dir  # noqa: E402
from training.model import CIFAR_MEAN, PLAIN_DEPTH, init_whitening, net_for  # noqa: E402

RECIPE = dict(
    optimizer="sgd",  # Nesterov SGD throughout (see MUON below for the alternative)
    epochs=16,  # passes over the training set; may be fractional
    batch_size=1024,
    lr=11.5,  # per 1024 examples, decoupled from momentum (airbench's parametrisation)
    momentum=0.85,  # Nesterov
    weight_decay=0.0153,  # per 1024 examples, decoupled from lr
    bias_scaler=64.0,  # BatchNorm biases learn 64x faster (but decay no faster)
    label_smoothing=0.2,
    warmup=0.23,  # lr rises 0.2 -> 1 over this fraction of steps, then falls to end_lr
    end_lr=0.07,
    whiten_bias_epochs=3,  # the whitening layer's bias trains this long, then freezes
    widths=(64, 256, 256),  # channels of the three conv blocks
    depth=3,  # convs per block (3: airbench96's residual block)
    bn_momentum=0.6,
    scaling_factor=1 / 9,  # scales the logits down at init
    translate=2,  # random shifts of up to 2 px (reflect-padded)
    cutout=0,  # side of a random square blanked per image (0: off)
    crop_p=0.4,  # share of images reframed by a random resized crop each epoch: photos frame closer
    crop_scale=0.35,  # the smallest crop, as a share of the image's area
    jitter=0.2,  # colour jitter: brightness, contrast and saturation scaled by up to 1 +/- this
    lookahead=True,  # EMA of the weights, copied back every 5 steps
    lookahead_start_epoch=3,
    tta_level=2,  # at test time: 0 none, 1 mirror, 2 mirror + 1 px shifts
    val_size=2000,  # held out of training to fit the softmax temperature
    precision="mixed_bfloat16",
)
# --fast: airbench94 itself (two convs per block), 10 epochs: under half the time.
FAST = dict(RECIPE, depth=PLAIN_DEPTH, epochs=10)
# --muon: airbench94_muon's optimiser (tuned at batch 2000, summed loss): Muon on the 3x3
# filters, SGD for biases and head, linear decay to 0, no lookahead. The whitening bias moves on
# the first step only: trained at bias_lr it grew past 100 and the eval-mode net collapsed (NOTES.md 5).
MUON = dict(
    RECIPE,
    optimizer="muon",
    batch_size=2000,
    muon_lr=0.24,
    muon_momentum=0.6,
    momentum=0.85,
    bias_lr=0.053,
    head_lr=0.67,
    weight_decay=2e-6 * 2000,
    warmup=0,
    end_lr=0,
    lookahead=False,
    scaling_factor=1 / 256,
    whiten_bias_epochs=0,
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="dataset archive or folder (default: the shared JPEG copy, else the official archive, downloaded)",
    )
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--epochs", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="the 30-minute preset")
    p.add_argument("--muon", action="store_true", help="the Muon optimiser preset (MUON above)")
    p.add_argument("--limit", type=int, help="train on the first N images only (smoke tests)")
    p.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe values, e.g. --set cutout=12 widths=[64,256,256] (may be repeated)",
    )
    args = p.parse_args(argv)
    recipe = dict(MUON if args.muon else FAST if args.fast else RECIPE)
    for item in args.set:
        key, value = item.split("=", 1)
        recipe[key] = json.loads(value)
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    train(recipe, data=args.data, out=Path(args.out), seed=args.seed, limit=args.limit)


def train(recipe: dict, data=None, out: Path = DEFAULT_MODEL_DIR, seed: int = 0, limit: int | None = None) -> dict:
    t_start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(recipe["precision"])
    rng = np.random.default_rng(seed)

    ds = load_dataset(data)
    x, y, val_x, val_y = split_validation(ds.train_x, ds.train_y, recipe["val_size"], limit)
    print(
        f"data: {ds.source} ({len(x)} train, {len(val_x)} val, {len(ds.test_x)} test, "
        f"{len(ds.classes)} classes) in {time.perf_counter() - t_start:.1f}s",
        flush=True,
    )

    model = net_for(recipe, len(ds.classes))
    init_whitening(model, x[:5000])
    t_train = time.perf_counter()
    history, steps = fit(model, recipe, x, y, val_x, val_y, len(ds.classes), rng)
    train_seconds = time.perf_counter() - t_train

    meta = save_model_dir(
        model,
        out,
        recipe=recipe,
        dataset=ds,
        seed=seed,
        history=history,
        val=(val_x, val_y),
        train_seconds=train_seconds,
        started=t_start,
    )
    print(
        f"done: {steps} steps, {len(history)} epochs; training {train_seconds / 60:.1f} min, "
        f"total wall time {meta['wall_seconds'] / 60:.1f} min; temperature "
        f"{meta['temperature']:.3f}; saved {out}",
        flush=True,
    )
    return meta


def split_validation(x: np.ndarray, y: np.ndarray, val_size: int, limit: int | None = None):
    """(train_x, train_y, val_x, val_y): a fixed validation split, the same for every seed (for
    the temperature and the epoch log); `limit` keeps the first N images only (smoke tests)."""
    perm = np.random.default_rng(12345).permutation(len(x))[:limit]
    n_val = min(val_size, len(perm) // 5)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def fit(model, recipe: dict, x, y, val_x, val_y, num_classes: int, rng) -> tuple[list[dict], int]:
    """The training loop: returns the per-epoch history and the number of steps taken."""
    bs = min(recipe["batch_size"], len(x))
    steps_per_epoch = len(x) // bs  # drop the ragged last batch
    total_steps = math.ceil(steps_per_epoch * recipe["epochs"])
    whiten_steps = steps_per_epoch * recipe["whiten_bias_epochs"]
    make_step = muon_train_step if recipe["optimizer"] == "muon" else sgd_train_step
    train_step = make_step(model, recipe, num_classes, bs)
    lookahead = Lookahead(model) if recipe["lookahead"] else None

    @tf.function(reduce_retracing=True)
    def predict_logits(images):
        return model(images, training=False)

    # Augmentation on uint8 arrays: flip half of the images once, then every odd epoch flip
    # them all (airbench's alternating flip: each image is seen both ways, in turn).
    t = recipe["translate"]
    flipped = np.where(rng.random(len(x))[:, None, None, None] < 0.5, x[:, :, ::-1], x)
    padded = np.pad(flipped, ((0, 0), (t, t), (t, t), (0, 0)), mode="reflect")

    history, step = [], 0
    for epoch in range(math.ceil(recipe["epochs"])):
        t_epoch = time.perf_counter()
        images = augment(padded, epoch, rng, t, recipe["cutout"])
        images = reframe(images, rng, recipe.get("crop_p", 0.0), recipe.get("crop_scale", 0.35))
        images = jitter_colours(images, rng, recipe.get("jitter", 0.0))
        order = rng.permutation(len(images))
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(min(steps_per_epoch, total_steps - step)):
            idx = order[i * bs : (i + 1) * bs]
            loss, c = train_step(
                tf.constant(images[idx]),
                tf.constant(y[idx]),
                lr_factor(recipe, step, total_steps),
                max(0.0, 1 - step / max(whiten_steps, 1)),
            )
            loss_sum, correct, seen, step = loss_sum + float(loss), correct + int(c), seen + len(idx), step + 1
            if lookahead and epoch >= recipe["lookahead_start_epoch"] and step % 5 == 0:
                # The decay warms up over training: move fast early, average hard at the end.
                lookahead.update(0.95**5 * (step / total_steps) ** 3)
        if lookahead:
            lookahead.finish_epoch()  # the net leaves each epoch at the EMA
        history.append(
            dict(
                epoch=epoch + 1,
                loss=loss_sum / max(seen, 1),
                train_acc=correct / max(seen, 1),
                val_acc=accuracy(predict_logits, val_x, val_y) if len(val_x) else float("nan"),
                seconds=time.perf_counter() - t_epoch,
            )
        )
        row = history[-1]
        print(
            f"epoch {row['epoch']:3d}  loss {row['loss']:.4f}  train_acc {row['train_acc']:.4f}  "
            f"val_acc {row['val_acc']:.4f}  {row['seconds']:6.1f}s",
            flush=True,
        )
    return history, step


def lr_factor(recipe: dict, step: int, total_steps: int) -> float:
    """The learning rate's multiplier: warm up from 0.2 to 1, then decay linearly to end_lr."""
    w = int(recipe["warmup"] * total_steps)
    if step < w:
        return 0.2 + 0.8 * step / w
    return 1 + (recipe["end_lr"] - 1) * (step - w) / max(1, total_steps - w)


class Lookahead:
    """An EMA of all float weights (BatchNorm statistics included), copied back into the net."""

    def __init__(self, model):
        self.state = [v for v in model.weights if v.dtype == "float32"]
        self.ema = [tf.Variable(v.value, trainable=False) for v in self.state]
        self.started = False

    @tf.function
    def _blend(self, rho):
        for e, v in zip(self.ema, self.state, strict=True):
            e.assign(rho * e + (1 - rho) * v)
            v.assign(e)

    def update(self, rho: float) -> None:
        # The first update starts the average at the current weights.
        self._blend(tf.constant(rho if self.started else 0.0, tf.float32))
        self.started = True

    def finish_epoch(self) -> None:
        if self.started:
            self._blend(tf.constant(1.0, tf.float32))


def smoothed_loss(model, images, labels, num_classes, smoothing):
    logits = model(images, training=True)
    targets = tf.one_hot(labels, num_classes) * (1 - smoothing) + smoothing / num_classes
    loss = tf.reduce_sum(keras.losses.categorical_crossentropy(targets, logits, from_logits=True))
    correct = tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == labels, tf.int32))
    return loss, correct


def sgd_train_step(model, recipe, num_classes, bs):
    """airbench94's optimiser: Nesterov SGD, its decoupled hyperparameters made plain SGD numbers."""
    kilostep_scale = 1024 * (1 + 1 / (1 - recipe["momentum"]))  # Nesterov's step amplification
    lr = recipe["lr"] / kilostep_scale
    wd = recipe["weight_decay"] * bs / kilostep_scale
    optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=recipe["momentum"], nesterov=True)
    whiten_bias = model.get_layer("whiten").bias
    trainable = [v for v in model.trainable_variables if v is not model.get_layer("whiten").kernel]
    is_bn_bias = [("norm" in v.path) for v in trainable]
    # Weight decay as an L2 term on the summed loss (Keras' SGD weight_decay would be decoupled):
    # coefficient wd/lr, and wd/(lr*bias_scaler) for BN biases, whose gradients are then scaled up.
    decay = [wd / lr / (recipe["bias_scaler"] if bn else 1) for bn in is_bn_bias]
    scale = [recipe["bias_scaler"] if bn else 1.0 for bn in is_bn_bias]
    optimizer.build(trainable)
    rest = [i for i, v in enumerate(trainable) if v is not whiten_bias]

    @tf.function(reduce_retracing=True)
    def step(images, labels, train_whiten_bias: bool):
        with tf.GradientTape() as tape:
            loss, correct = smoothed_loss(model, images, labels, num_classes, recipe["label_smoothing"])
        grads = tape.gradient(loss, trainable)
        grads = [(g + c * v) * s for g, v, c, s in zip(grads, trainable, decay, scale, strict=True)]
        if train_whiten_bias:
            optimizer.apply(grads, trainable)
        else:  # the frozen bias sits out the update: no gradient, no momentum leak
            optimizer.apply([grads[i] for i in rest], [trainable[i] for i in rest])
        return loss, correct

    def train_step(images, labels, lr_factor: float, whiten_factor: float):
        optimizer.learning_rate.assign(lr * lr_factor)
        return step(images, labels, whiten_factor > 0)  # two traces, one per whitening phase

    return train_step


def newton_schulz(g, steps: int = 3):
    """Approximately orthogonalise g (rows <= cols): Muon's quintic iteration, tuned for few steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (tf.norm(g) + 1e-7)  # top singular value <= 1
    for _ in range(steps):
        xxt = tf.matmul(x, x, transpose_b=True)
        x = a * x + tf.matmul(b * xxt + c * tf.matmul(xxt, xxt), x)
    return x


def muon_train_step(model, recipe, num_classes, bs):
    """airbench94_muon's optimiser: Muon for the 3x3 filters, Nesterov SGD for biases and head."""
    filters = [
        layer.kernel for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.name != "whiten"
    ]
    whiten_bias = model.get_layer("whiten").bias
    biases = [v for v in model.trainable_variables if "norm" in v.path]
    head = model.get_layer("head").kernel
    head.assign(head / tf.math.reduce_std(head))  # unit-variance head; the logits layer scales it
    trainable = filters + biases + [whiten_bias, head]
    sgd_lr = [recipe["bias_lr"]] * (len(biases) + 1) + [recipe["head_lr"]]
    momentum = [tf.Variable(tf.zeros_like(v), trainable=False) for v in trainable]
    m_mu, m_sgd, wd = recipe["muon_momentum"], recipe["momentum"], recipe["weight_decay"]
    n = len(filters)

    @tf.function(reduce_retracing=True)
    def step(images, labels, lr_factor, whiten_factor):
        with tf.GradientTape() as tape:
            loss, correct = smoothed_loss(model, images, labels, num_classes, recipe["label_smoothing"])
        grads = tape.gradient(loss, trainable)
        for v, g, buf in zip(filters, grads[:n], momentum[:n], strict=True):
            buf.assign(m_mu * buf + g)
            g = g + m_mu * buf  # Nesterov
            cout = v.shape[-1]
            # The filters feed BatchNorm, so their scale is free: pin it, and the step size is exact.
            v.assign(v * (cout**0.5) / tf.norm(v))
            update = tf.transpose(newton_schulz(tf.transpose(tf.reshape(g, (-1, cout)))))
            v.assign_sub(recipe["muon_lr"] * lr_factor * tf.reshape(update, v.shape))
        for v, g, buf, lr in zip(trainable[n:], grads[n:], momentum[n:], sgd_lr, strict=True):
            factor = whiten_factor if v is whiten_bias else lr_factor
            g = g + (wd / lr) * v  # coupled L2, as torch's SGD weight_decay
            buf.assign(m_sgd * buf + g)
            v.assign_sub(lr * factor * (g + m_sgd * buf))
        return loss, correct

    def train_step(images, labels, lr_factor: float, whiten_factor: float):
        return step(images, labels, tf.constant(lr_factor, tf.float32), tf.constant(whiten_factor, tf.float32))

    return train_step


def augment(padded: np.ndarray, epoch: int, rng: np.random.Generator, t: int, cutout: int) -> np.ndarray:
    n, size = len(padded), padded.shape[1] - 2 * t
    shifts = rng.integers(0, 2 * t + 1, size=(n, 2))
    out = np.empty((n, size, size, padded.shape[3]), np.uint8)
    for dy in range(2 * t + 1):  # 25 vectorised copies instead of 50,000 small ones
        for dx in range(2 * t + 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[m] = padded[m, dy : dy + size, dx : dx + size]
    if epoch % 2 == 1:
        out = out[:, :, ::-1]
    if cutout:
        # Blank a random square (clipped at the border) with the mean colour: 0 after normalising.
        cy, cx = rng.integers(0, size, size=(2, n, 1))
        r = np.arange(size)[None, :]
        rows = (r >= cy - cutout // 2) & (r < cy + (cutout + 1) // 2)
        cols = (r >= cx - cutout // 2) & (r < cx + (cutout + 1) // 2)
        out = out.copy()
        out[rows[:, :, None] & cols[:, None, :]] = np.round(CIFAR_MEAN).astype(np.uint8)
    return np.ascontiguousarray(out)


def reframe(images: np.ndarray, rng: np.random.Generator, p: float, min_scale: float) -> np.ndarray:
    """A random resized crop (area min_scale..1, aspect 3:4..4:3) of a share p of the images:
    CIFAR objects fill a centred frame, photos show them closer, cut off or off-centre."""
    pick = np.flatnonzero(rng.random(len(images)) < p)
    if not len(pick):
        return images
    area = rng.uniform(min_scale, 1.0, len(pick))
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), len(pick)))
    h, w = np.minimum(1.0, np.sqrt(area / ratio)), np.minimum(1.0, np.sqrt(area * ratio))
    y0, x0 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
    boxes = np.stack([y0, x0, y0 + h, x0 + w], axis=1).astype(np.float32)
    out = images.copy()
    for i in range(0, len(pick), 8192):  # chunks: bounded float memory
        chunk = pick[i : i + 8192]
        crops = tf.image.crop_and_resize(
            tf.cast(images[chunk], tf.float32), boxes[i : i + 8192], tf.range(len(chunk)), images.shape[1:3]
        )
        out[chunk] = np.clip(np.round(crops.numpy()), 0, 255).astype(np.uint8)
    return out


def jitter_colours(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by 1 +/- up to strength: photos come from
    cameras and light unlike CIFAR's."""
    if not strength:
        return images
    out = np.empty_like(images)
    for i in range(0, len(images), 8192):
        x = images[i : i + 8192].astype(np.float32)
        b, c, s = rng.uniform(1 - strength, 1 + strength, (3, len(x), 1, 1, 1)).astype(np.float32)
        x *= b
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * c + mean
        grey = x.mean(axis=3, keepdims=True)
        x = (x - grey) * s + grey
        out[i : i + 8192] = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return out


def accuracy(predict_logits, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    preds = np.concatenate(
        [np.argmax(predict_logits(tf.constant(images[i : i + batch])), 1) for i in range(0, len(images), batch)]
    )
    return float(np.mean(preds == labels))


if __name__ == "__main__":
    main()
