"""U-Nets for segmentation (2D on slices, 3D on patches), in Keras 3 layers only.

Ronneberger et al.'s encoder-decoder with skip connections, as nnU-Net configures it: two
3x3(x3) convolutions with normalisation and ReLU per level, max pooling down, transposed
convolutions up. Spatial input sizes are left open (fully convolutional), so a model trained
on patches predicts whole slices or sliding windows; each spatial size must be a multiple
of ``2 ** (len(filters) - 1)``. No backend-specific code: runs on TensorFlow, JAX or PyTorch.
"""

from __future__ import annotations

import keras
from keras import layers

NORMS = ("batch", "instance", "group", "none")


def _norm(kind: str, filters: int, name: str, momentum: float):
    if kind == "batch":
        return layers.BatchNormalization(momentum=momentum, name=name)
    if kind == "instance":
        return layers.GroupNormalization(groups=-1, name=name)
    if kind == "group":
        return layers.GroupNormalization(groups=min(8, filters), name=name)
    return None


def build_unet(
    ndim: int,
    input_shape: tuple[int, ...],
    *,
    filters: tuple[int, ...] | list[int] = (16, 32, 64, 128),
    norm: str = "batch",
    n_classes: int = 1,
    dropout: float = 0.0,
    bn_momentum: float = 0.9,
) -> keras.Model:
    """A ``ndim``-D U-Net.

    Args:
        input_shape: spatial shape and channels, e.g. (Y, X, 1) or (Z, Y, X, 1); spatial sizes
            may be None (the model is built fully convolutional either way).
        filters: channels per level, from the top; ``len(filters)`` levels.
        norm: ``batch``, ``instance``, ``group`` (8 groups) or ``none``.
        n_classes: 1 for a sigmoid foreground map; more for a softmax over labels 0..n-1.
        dropout: dropout at the bottom of the U.
        bn_momentum: BatchNorm momentum (0.9 settles within a few epochs of a small cohort).
    """
    if ndim not in (2, 3):
        raise ValueError(f"Received ndim={ndim}, expected 2 or 3.")
    if norm not in NORMS:
        raise ValueError(f"Received norm={norm!r}, expected one of {', '.join(NORMS)}.")
    if len(filters) < 2:
        raise ValueError(f"Received filters={list(filters)}, expected at least 2 levels.")
    conv = layers.Conv2D if ndim == 2 else layers.Conv3D
    up = layers.Conv2DTranspose if ndim == 2 else layers.Conv3DTranspose
    pool = layers.MaxPooling2D if ndim == 2 else layers.MaxPooling3D
    channels = int(input_shape[-1]) if input_shape and input_shape[-1] else 1
    inputs = keras.Input(shape=(None,) * ndim + (channels,), name="image")

    def block(x, f: int, name: str):
        for j in range(2):
            x = conv(int(f), 3, padding="same", use_bias=norm == "none", name=f"{name}_conv{j}")(x)
            layer = _norm(norm, int(f), f"{name}_norm{j}", bn_momentum)
            if layer is not None:
                x = layer(x)
            x = layers.Activation("relu", name=f"{name}_relu{j}")(x)
        return x

    skips = []
    x = inputs
    for level, f in enumerate(filters[:-1]):
        x = block(x, f, f"down{level}")
        skips.append(x)
        x = pool(2, name=f"pool{level}")(x)
    x = block(x, filters[-1], "bottom")
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    for level in reversed(range(len(filters) - 1)):
        x = up(int(filters[level]), 2, strides=2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = block(x, filters[level], f"dec{level}")
    activation = "sigmoid" if n_classes == 1 else "softmax"
    outputs = conv(int(n_classes), 1, activation=activation, dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=f"unet{ndim}d")


def build_unet2d(input_shape: tuple[int, ...], **params) -> keras.Model:
    """A 2D U-Net on slices; see ``build_unet``."""
    return build_unet(2, input_shape, **params)


def build_unet3d(input_shape: tuple[int, ...], **params) -> keras.Model:
    """A 3D U-Net on volumes or patches; see ``build_unet``."""
    return build_unet(3, input_shape, **params)


def size_multiple(model: keras.Model) -> int:
    """What every spatial input size must be a multiple of (2 per pooling level)."""
    pools = sum(1 for layer in model.layers if "Pooling" in type(layer).__name__)
    return 2**pools
