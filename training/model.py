"""The network: airbench's fast CIFAR-10 CNN, in plain Keras layers.

Only built-in layers, so the saved .keras file loads anywhere Keras does, with
no custom code. Input is the raw uint8 32x32 RGB image; normalisation is inside.
"""

from __future__ import annotations

import keras
import numpy as np

# Per-channel statistics of CIFAR-10's training pixels (0-255 scale).
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465]) * 255
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616]) * 255
WHITEN_KERNEL = 2  # 2x2 patches -> 12 dims -> 24 whitening filters (+/- each eigenvector)


def torch_default_init():
    # PyTorch's default conv/linear init, which airbench's hyperparameters were tuned with.
    return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


def conv(width: int, name: str) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(
        width, 3, padding="same", use_bias=False, kernel_initializer=torch_default_init(), name=name
    )


def batch_norm(momentum: float, name: str) -> keras.layers.BatchNormalization:
    # Keras momentum is the weight of the old statistic (PyTorch's is 1 - that).
    # No learned scale: airbench freezes BN weights at 1 and trains only the bias.
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=1e-12, scale=False, name=name)


PLAIN_DEPTH = 2  # convs per block in airbench94; recipes saved before `depth` existed had this


def net_for(recipe: dict, num_classes: int, name: str = "airbench") -> keras.Model:
    """The net a training recipe (training/train.py, saved in model.json) describes."""
    depth = recipe.get("depth", PLAIN_DEPTH)
    return build_net(num_classes, recipe["widths"], recipe["bn_momentum"], recipe["scaling_factor"], depth, name)


def build_net(
    num_classes: int = 10,
    widths=(64, 256, 256),
    bn_momentum: float = 0.6,
    scaling_factor: float = 1 / 9,
    depth: int = PLAIN_DEPTH,
    name: str = "airbench",
) -> keras.Model:
    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = keras.layers.Normalization(mean=CIFAR_MEAN, variance=CIFAR_STD**2, name="normalize")(inputs)
    # Patch-whitening: fixed filters from the data's 2x2 patch covariance (set in init_whitening).
    x = keras.layers.Conv2D(2 * 3 * WHITEN_KERNEL**2, WHITEN_KERNEL, padding="valid", name="whiten")(x)
    x = keras.layers.Activation("gelu", name="whiten_gelu")(x)
    for i, width in enumerate(widths, start=1):
        x = conv(width, f"block{i}_conv1")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        x = batch_norm(bn_momentum, f"block{i}_norm1")(x)
        x = skip = keras.layers.Activation("gelu", name=f"block{i}_gelu1")(x)
        for j in range(2, depth + 1):
            x = conv(width, f"block{i}_conv{j}")(x)
            x = batch_norm(bn_momentum, f"block{i}_norm{j}")(x)
            x = keras.layers.Activation("gelu", name=f"block{i}_gelu{j}")(x)
        if depth > 2:  # airbench96's deeper block: the extra convs sit on a residual path
            x = keras.layers.Add(name=f"block{i}_residual")([x, skip])
    x = keras.layers.MaxPooling2D(3, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=torch_default_init(), name="head")(x)
    # Small logits at init; float32 so the loss and softmax never run in bfloat16.
    logits = keras.layers.Rescaling(scaling_factor, dtype="float32", name="logits")(x)
    model = keras.Model(inputs, logits, name=name)
    _dirac_init(model)
    return model


def _dirac_init(model: keras.Model) -> None:
    """Identity-initialise the first in-channels of each 3x3 conv: an implicit residual path."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.name != "whiten":
            k = layer.kernel.numpy()
            n = min(k.shape[2], k.shape[3])
            k[:, :, :, :n] = 0
            k[1, 1, np.arange(n), np.arange(n)] = 1
            layer.kernel.assign(k)


def init_whitening(model: keras.Model, images: np.ndarray, eps: float = 5e-4) -> None:
    """Set the whitening conv to the eigenvectors of the patch covariance, scaled to unit variance."""
    x = (images.astype(np.float64) - CIFAR_MEAN) / CIFAR_STD
    k = WHITEN_KERNEL
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    # (N, h, w, k, k, C) patches, flattened in the conv kernel's (kh, kw, C) order.
    patches = np.stack([x[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)], axis=3)
    flat = patches.reshape(-1, k * k * x.shape[3])
    eigenvalues, eigenvectors = np.linalg.eigh(flat.T @ flat / len(flat))
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1).reshape(k, k, x.shape[3], -1)
    layer = model.get_layer("whiten")
    layer.kernel.assign(kernel.astype(np.float32))
    layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
