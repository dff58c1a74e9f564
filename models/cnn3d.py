"""A small 3D CNN for study-level classification of volumes.

Why 3D: labels are per study and a nodule occupies a few slices anywhere in the lungs. A 3D
network with global max pooling answers "is there a nodule anywhere?" directly from the
study label; a 2D network would need slice labels we do not have, or multiple-instance
aggregation over slices. Written with Keras 3 layers only, so it runs on any backend.
"""

from __future__ import annotations

import keras
from keras import layers

from models.cnn2d import classifier_head


def build_cnn3d(
    input_shape: tuple[int, int, int, int],
    *,
    filters: tuple[int, ...] | list[int] = (8, 16, 32, 64),
    pooling: str = "max",
    dropout: float = 0.0,
    dense: int = 0,
    bn_momentum: float = 0.9,
    n_classes: int = 2,
) -> keras.Model:
    """Conv3D → BatchNorm → ReLU → MaxPool blocks, then global pooling and the classifier head.

    Args:
        input_shape: (Z, Y, X, channels).
        filters: channels of each block (one block per entry).
        pooling: ``max`` (is the finding anywhere?) or ``maxavg`` (also the average).
        dropout: dropout before the classifier.
        dense: units of a hidden dense layer (0 for none).
        bn_momentum: BatchNorm moving-average momentum. Small cohorts give few steps per
            epoch; 0.9 lets inference statistics settle within a few epochs (0.99 did not).
        n_classes: 2 for one sigmoid unit (binary), K > 2 for K softmax units.
    """
    if not filters:
        raise ValueError("Received filters=[], expected at least one block.")
    if pooling not in ("max", "maxavg"):
        raise ValueError(f"Received pooling={pooling!r}, expected 'max' or 'maxavg'.")
    inputs = keras.Input(shape=tuple(input_shape), name="volume")
    x = inputs
    for i, f in enumerate(filters):
        x = layers.Conv3D(int(f), 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling3D(2, padding="same", name=f"pool{i}")(x)
    if pooling == "max":
        x = layers.GlobalMaxPooling3D(name="pool")(x)
    else:
        x = layers.Concatenate(name="pool")([layers.GlobalMaxPooling3D()(x), layers.GlobalAveragePooling3D()(x)])
    if dropout:
        x = layers.Dropout(dropout)(x)
    if dense:
        x = layers.Dense(int(dense), activation="relu")(x)
    return keras.Model(inputs, classifier_head(x, n_classes), name="cnn3d")
