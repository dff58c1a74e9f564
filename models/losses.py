"""Segmentation loss and metric, in ``keras.ops`` only (any backend).

Dice + binary cross-entropy, as nnU-Net trains: the soft Dice term copes with the imbalance
of small foreground objects, the cross-entropy term gives smooth gradients early on.
Registered with Keras' serialisation, so saved models and checkpoints load without
custom-object arguments once this module is imported.
"""

from __future__ import annotations

import keras
from keras import ops

_EPS = 1e-6


def _spatial_axes(y) -> list[int]:
    return list(range(1, len(y.shape)))


@keras.saving.register_keras_serializable(package="medflow")
class DiceCELoss(keras.losses.Loss):
    """``(1 - soft Dice) + ce_weight * binary cross-entropy``, per sample.

    Args:
        smooth: added to numerator and denominator of Dice (a patch without foreground that
            is predicted empty scores Dice 1).
        ce_weight: weight of the cross-entropy term.
    """

    def __init__(self, smooth: float = 1.0, ce_weight: float = 1.0, name: str = "dice_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth, self.ce_weight = float(smooth), float(ce_weight)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        p = ops.clip(y_pred, _EPS, 1.0 - _EPS)
        axes = _spatial_axes(p)
        inter = ops.sum(y_true * p, axis=axes)
        denom = ops.sum(y_true, axis=axes) + ops.sum(p, axis=axes)
        dice = (2.0 * inter + self.smooth) / (denom + self.smooth)
        ce = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=axes)
        return (1.0 - dice) + self.ce_weight * ce

    def get_config(self) -> dict:
        return {**super().get_config(), "smooth": self.smooth, "ce_weight": self.ce_weight}


@keras.saving.register_keras_serializable(package="medflow")
def dice_score(y_true, y_pred):
    """Hard Dice per sample (prediction thresholded at 0.5); 1 when both are empty."""
    y_true = ops.cast(y_true > 0.5, "float32")
    y_hat = ops.cast(y_pred > 0.5, "float32")
    axes = _spatial_axes(y_hat)
    inter = ops.sum(y_true * y_hat, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_hat, axis=axes)
    return ops.where(denom > 0, 2.0 * inter / ops.maximum(denom, _EPS), ops.ones_like(denom))
