"""2D image classifiers: the classic chest X-ray CNN, a small ResNet, and EfficientNetB0.

All take ``input_shape`` (H, W, channels) and ``n_classes``: two classes get one sigmoid unit
(binary cross-entropy, as the classic program), K > 2 get K softmax units (categorical
cross-entropy). Keras 3 layers only, so they run on any backend; nothing is downloaded
(``weights=None``): the models train from scratch.
"""

from __future__ import annotations

import keras
from keras import layers


def classifier_head(x, n_classes: int, *, name: str = "score"):
    """One sigmoid unit for two classes, else ``n_classes`` softmax units (float32 under mixed precision)."""
    if n_classes < 2:
        raise ValueError(f"Received n_classes={n_classes}, expected at least 2.")
    if n_classes == 2:
        return layers.Dense(1, activation="sigmoid", dtype="float32", name=name)(x)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name=name)(x)


def build_seed_cnn(input_shape: tuple[int, int, int] = (150, 150, 1), *, n_classes: int = 2,
                   filters: tuple[int, ...] | list[int] = (32, 64, 128), dense: int = 512,
                   dropout: float = 0.5, batch_norm: bool = False) -> keras.Sequential:
    """The classic Keras ``Sequential`` pneumonia classifier, layer for layer.

    Conv2D 32, 64, 128 (3x3, ReLU) each followed by 2x2 max pooling, Flatten, Dense 512 (ReLU),
    Dropout 0.5 and a sigmoid unit; at 150x150x1 it has 19,033,601 parameters.

    Args:
        input_shape: (H, W, channels); the program used 150x150.
        n_classes: 2 for the program's binary output; K > 2 ends in K softmax units instead.
        filters: channels of the three convolutions.
        dense: units of the hidden dense layer.
        dropout: dropout rate before the output.
        batch_norm: not in the program: batch normalisation between each convolution (and the dense layer) and
            its ReLU, which keeps the ReLUs alive at the program's learning rate (``examples/xray_seed_tuned.yaml``);
            momentum 0.9, so that the moving statistics that inference uses settle within the few dozen steps of
            a small dataset (Keras' 0.99 takes hundreds, and validation then sees other statistics than training).
    """
    model = keras.Sequential(name="seed_cnn")
    model.add(keras.Input(shape=tuple(input_shape)))
    for f in filters:
        if batch_norm:
            model.add(layers.Conv2D(int(f), (3, 3), use_bias=False))
            model.add(layers.BatchNormalization(momentum=0.9))
            model.add(layers.Activation("relu"))
        else:
            model.add(layers.Conv2D(int(f), (3, 3), activation="relu"))
        model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Flatten())
    if batch_norm:
        model.add(layers.Dense(int(dense), use_bias=False))
        model.add(layers.BatchNormalization(momentum=0.9))
        model.add(layers.Activation("relu"))
    else:
        model.add(layers.Dense(int(dense), activation="relu"))
    model.add(layers.Dropout(dropout))
    if n_classes == 2:
        model.add(layers.Dense(1, activation="sigmoid", dtype="float32", name="score"))
    else:
        model.add(layers.Dense(int(n_classes), activation="softmax", dtype="float32", name="score"))
    return model


def _preact_block(x, filters: int, stride: int, name: str):
    """Pre-activation residual block (BN-ReLU-Conv twice), projection shortcut when the shape changes."""
    pre = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(x)
    pre = layers.Activation("relu", name=f"{name}_relu1")(pre)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(pre)
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(pre)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    y = layers.Activation("relu", name=f"{name}_relu2")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    return layers.Add(name=f"{name}_add")([shortcut, y])


def build_resnet2d(input_shape: tuple[int, int, int], *, n_classes: int = 2,
                   filters: tuple[int, ...] | list[int] = (16, 32, 64, 128), blocks: int = 1,
                   stem_stride: int = 2, pooling: str = "avg", dropout: float = 0.2) -> keras.Model:
    """A pre-activation ResNet for 2D images, sized by ``filters`` and ``blocks`` to train from scratch.

    A 5x5 stem convolution, then one stage per entry of ``filters`` (``blocks`` residual blocks
    each, the first of every stage after the first halving the resolution), BN-ReLU, global
    average pooling, dropout and the classifier head. ``filters=(64, 128, 256, 512), blocks=2``
    is ResNet-18's layout.

    Args:
        input_shape: (H, W, channels).
        n_classes: number of classes (2: one sigmoid unit).
        filters: channels per stage.
        blocks: residual blocks per stage.
        stem_stride: stride of the stem convolution (2 halves large images at once).
        pooling: ``avg`` (global average, the ResNet default) or ``max`` (is the finding anywhere? Small
            findings keep their weight, and Grad-CAM localises them more sharply).
        dropout: dropout before the head.
    """
    if not filters:
        raise ValueError("Received filters=[], expected at least one stage.")
    if pooling not in ("avg", "max"):
        raise ValueError(f"Received pooling={pooling!r}, expected 'avg' or 'max'.")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Conv2D(int(filters[0]), 5, strides=stem_stride, padding="same", use_bias=False, name="stem")(inputs)
    for s, f in enumerate(filters):
        for b in range(int(blocks)):
            x = _preact_block(x, int(f), 2 if (s > 0 and b == 0) else 1, name=f"s{s}b{b}")
    x = layers.BatchNormalization(momentum=0.9, name="post_bn")(x)
    x = layers.Activation("relu", name="post_relu")(x)
    x = (layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D)(name="pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inputs, classifier_head(x, n_classes), name="resnet2d")


def build_efficientnet_b0(input_shape: tuple[int, int, int], *, n_classes: int = 2, dropout: float = 0.2
                          ) -> keras.Model:
    """``keras.applications.EfficientNetB0`` without pretrained weights, with our classifier head.

    Grayscale input is fine (``weights=None`` accepts any channel count). The network rescales
    its input by 1/255 internally, as for 8-bit images; its batch normalisation absorbs that
    for inputs already in [0, 1].
    """
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=tuple(input_shape),
                                             pooling="avg")
    x = layers.Dropout(dropout, name="dropout")(base.output) if dropout else base.output
    return keras.Model(base.input, classifier_head(x, n_classes), name="efficientnet_b0")
