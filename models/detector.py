"""A 3D lesion detector in Keras 3: CenterNet-style heat map and size heads on a U-Net backbone.

Zhou et al.'s "Objects as Points" (2019) in 3D: the network predicts, for every voxel, the
probability that a lesion centre lies there (a heat map trained with the penalty-reduced focal
loss against Gaussians around the true centres) and the lesion's diameter (L1, learnt near the
centres). Detections are the local maxima of the heat map (a 3x3x3 max filter: the non-maximum
suppression of CenterNet), refined to the heat-weighted centroid of their neighbourhood.
Training draws patches (a share ``foreground_ratio`` of them around a lesion, the rest
anywhere); the model is fully convolutional and predicts whole volumes. No backend-specific
code: runs on TensorFlow, JAX or PyTorch. No Prefect here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

logger = logging.getLogger(__name__)

SIZE_SCALE = 10.0  # the size head predicts the diameter in cm (mm / 10): values near 1 train best
HEAT_PRIOR = 0.01  # initial heat everywhere (the focal-loss bias init of RetinaNet and CenterNet)


def build_centernet3d(input_shape: tuple[int, ...], *, filters=(8, 16, 32), norm: str = "batch",
                      head: int = 0, **unet_params) -> keras.Model:
    """A 3D U-Net (``models.unet``) with two heads on its last decoder block: ``heat`` (sigmoid, one channel)
    and ``size`` (diameter in cm, ReLU); the output concatenates them (channel 0 heat, 1 size). ``head`` > 0
    puts a 3x3x3 convolution of that many channels before each head's 1x1 output (CenterNet's heads; about
    a third of the training time of the smallest U-Net on a CPU), 0 none."""
    from models.unet import build_unet

    base = build_unet(3, input_shape, filters=filters, norm=norm, n_classes=1, **unet_params)
    features = base.get_layer("dec0_relu1").output

    def branch(name, activation, bias):
        x = layers.Conv3D(head, 3, padding="same", activation="relu", name=f"{name}_conv")(features) if head \
            else features
        return layers.Conv3D(1, 1, activation=activation, bias_initializer=keras.initializers.Constant(bias),
                             dtype="float32", name=name)(x)

    heat = branch("heat", "sigmoid", float(np.log(HEAT_PRIOR / (1 - HEAT_PRIOR))))
    size = branch("size", "relu", 1.0)
    out = layers.Concatenate(name="detections", dtype="float32")([heat, size])
    return keras.Model(base.input, out, name="centernet3d")


@keras.saving.register_keras_serializable(package="medflow")
class CenterNetLoss(keras.losses.Loss):
    """Penalty-reduced focal loss on the heat map (alpha 2, beta 4; normalised by the number of centres)
    plus ``size_weight`` x L1 of the diameter where the target heat is above 0.5.

    ``y_true`` channels: 0 target heat (1 at each centre voxel, Gaussian around it), 1 diameter (cm)."""

    def __init__(self, alpha: float = 2.0, beta: float = 4.0, size_weight: float = 0.1, name: str = "centernet",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta, self.size_weight = alpha, beta, size_weight

    def call(self, y_true, y_pred):
        heat_t, size_t = y_true[..., 0], y_true[..., 1]
        heat_p = ops.clip(y_pred[..., 0], 1e-6, 1 - 1e-6)
        size_p = y_pred[..., 1]
        pos = ops.cast(heat_t >= 0.999, "float32")
        axes = list(range(1, len(heat_t.shape)))
        pos_loss = ops.sum(-ops.log(heat_p) * ops.power(1 - heat_p, self.alpha) * pos, axis=axes)
        neg_loss = ops.sum(-ops.log(1 - heat_p) * ops.power(heat_p, self.alpha)
                           * ops.power(1 - heat_t, self.beta) * (1 - pos), axis=axes)
        n_pos = ops.maximum(ops.sum(pos) / ops.cast(ops.shape(pos)[0], "float32"), 1.0)
        near = ops.cast(heat_t > 0.5, "float32")
        size_loss = ops.sum(ops.abs(size_p - size_t) * near, axis=axes) / ops.maximum(ops.sum(near, axis=axes), 1.0)
        return (pos_loss + neg_loss) / n_pos + self.size_weight * size_loss

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta, "size_weight": self.size_weight}


def heat_target(shape, lesions: list[dict], spacing) -> tuple[np.ndarray, np.ndarray]:
    """Target heat and size (cm) of a volume from its lesions (``zyx`` on this grid, ``diameter_mm``).

    Each lesion is a Gaussian in mm with sigma = a quarter of its diameter (at least one voxel),
    exactly 1 at the voxel nearest its centre; overlapping Gaussians take the maximum.

    >>> heat, size = heat_target((5, 5, 5), [{"zyx": [2, 2, 2], "diameter_mm": 8.0}], (1.0, 1.0, 1.0))
    >>> float(heat[2, 2, 2]), round(float(heat[2, 2, 4]), 3), round(float(size[2, 2, 2]), 3)
    (1.0, 0.607, 0.8)
    """
    heat = np.zeros(shape, np.float32)
    size = np.zeros(shape, np.float32)
    spacing = np.asarray(spacing, dtype=float)
    for lesion in lesions:
        centre = np.asarray(lesion["zyx"], dtype=float)
        sigma = max(float(lesion["diameter_mm"]) / 4.0, float(spacing.max()))
        reach = np.ceil(3 * sigma / spacing).astype(int)
        lo = np.maximum(0, np.round(centre).astype(int) - reach)
        hi = np.minimum(np.asarray(shape), np.round(centre).astype(int) + reach + 1)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
        g = np.exp(-d2 / (2 * sigma**2)).astype(np.float32)
        peak = tuple(np.clip(np.round(centre).astype(int), 0, np.asarray(shape) - 1) - lo)
        g[peak] = 1.0
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        heat[box] = np.maximum(heat[box], g)
        size[box] = np.where(g >= heat[box], float(lesion["diameter_mm"]) / SIZE_SCALE, size[box])
    return heat, size


def sample_box(shape, size, rng: np.random.Generator, centres: np.ndarray, foreground_ratio: float
               ) -> tuple[slice, ...]:
    """A patch of ``size`` inside ``shape``: around a random centre with probability ``foreground_ratio``
    (when there is one), else anywhere."""
    shape, size = np.asarray(shape), np.minimum(np.asarray(size), np.asarray(shape))
    if len(centres) and rng.random() < foreground_ratio:
        c = centres[rng.integers(len(centres))]
        low, high = np.maximum(0, c - size + 1), np.minimum(shape - size, c)
        start = np.array([rng.integers(lo, max(lo, hi) + 1) for lo, hi in zip(low, high)])
    else:
        start = np.array([rng.integers(0, n - s + 1) for n, s in zip(shape, size)])
    return tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size))


def make_detection_dataset(loader: Callable[[str], tuple[np.ndarray, list[dict], tuple]], keys: list[str], *,
                           patch, batch_size: int, samples_per_volume: int, foreground_ratio: float,
                           augment: dict | None = None, seed: int = 0, fixed: bool = False):
    """A ``keras.utils.PyDataset`` of ``(image patches, target patches)`` (``models.training.sampled_dataset``);
    ``loader(key)`` gives a prepared volume, its lesions on that grid and its spacing. Flips move the targets
    with the image; intensity jitter changes the image only."""
    from models.training import sampled_dataset

    cache: dict[int, tuple] = {}
    flips = [{"z": 0, "y": 1, "x": 2}[a] for a in (augment or {}).get("flip", ())]
    jitter = float((augment or {}).get("intensity_jitter") or 0.0)

    def draw(i: int, rng: np.random.Generator):
        if i not in cache:
            image, lesions, spacing = loader(keys[i])
            heat, size = heat_target(image.shape, lesions, spacing)
            centres = np.array([np.round(les["zyx"]).astype(int) for les in lesions]).reshape(-1, 3)
            cache[i] = (image.astype(np.float32), np.stack([heat, size], axis=-1), centres)
        image, target, centres = cache[i]
        box = sample_box(image.shape, patch, rng, centres, foreground_ratio)
        x, y = image[box], target[box]
        for ax in flips:
            if rng.random() < 0.5:
                x, y = np.flip(x, axis=ax), np.flip(y, axis=ax)
        if jitter:
            x = x * (1.0 + rng.uniform(-jitter, jitter)) + rng.uniform(-jitter, jitter)
        return np.ascontiguousarray(x, dtype=np.float32)[..., None], np.ascontiguousarray(y, dtype=np.float32)

    return sampled_dataset(len(keys), draw, samples_per_item=samples_per_volume, batch_size=batch_size, seed=seed,
                           fixed=fixed)


def train_detector(*, loader, train_keys: list[str], val_keys: list[str], arch: str, params: dict, train: dict,
                   augment: dict, run_dir: str | Path, on_epoch=None) -> dict:
    """Build, train and save a detector (``fit_model``: checkpoints every epoch, resume, early stopping)."""
    from models import get
    from models.training import fit_model, make_optimizer
    from models.unet import size_multiple

    patch = tuple(int(p) for p in train["patch_size"])

    def build():
        model = get(arch)((*patch, 1), **params)
        multiple = size_multiple(model)
        if any(p % multiple for p in patch):
            raise ValueError(f"train.patch_size {list(patch)} must be a multiple of {multiple} in every axis for "
                             f"{arch} with {len(params.get('filters', (16, 32, 64)))} levels")
        model.compile(optimizer=make_optimizer(train), loss=CenterNetLoss())
        return model

    def datasets(initial_epoch: int):
        common = {"patch": patch, "batch_size": int(train["batch_size"]),
                  "samples_per_volume": int(train["samples_per_volume"]),
                  "foreground_ratio": float(train["foreground_ratio"])}
        train_ds = make_detection_dataset(loader, train_keys, augment=augment or None,
                                          seed=int(train["seed"]) + initial_epoch, **common)
        val_ds = make_detection_dataset(loader, val_keys, seed=int(train["seed"]) + 10_000, fixed=True, **common)
        return train_ds, val_ds

    return fit_model(build=build, datasets=datasets, train=train, run_dir=run_dir, on_epoch=on_epoch,
                     describe=f"{arch}: {len(train_keys)} train / {len(val_keys)} val volumes, patches {patch}, "
                              f"{train['samples_per_volume']} per volume, lesion ratio {train['foreground_ratio']}")


def predict_maps(model, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heat map and diameter map (mm) of a whole volume (padded to the model's size multiple)."""
    from models.unet import size_multiple

    vol = np.asarray(volume, dtype=np.float32)
    multiple = size_multiple(model)
    pad = [(0, (-n) % multiple) for n in vol.shape]
    padded = np.pad(vol, pad, mode="edge") if any(p[1] for p in pad) else vol
    out = np.asarray(model.predict(padded[None, ..., None], verbose=0)[0])
    crop = tuple(slice(0, n) for n in vol.shape)
    return out[crop + (0,)], out[crop + (1,)] * SIZE_SCALE


def peaks(heat: np.ndarray, *, min_score: float = 0.01, max_peaks: int = 50) -> list[dict]:
    """Local maxima of a heat map (3x3x3 neighbourhood) above ``min_score``, best first, at most
    ``max_peaks``; each ``{"zyx": heat-weighted centroid of its neighbourhood, "score", "index"}``.

    >>> h = np.zeros((5, 5, 5)); h[2, 2, 2], h[2, 2, 3] = 0.9, 0.3
    >>> [(p["index"], round(p["score"], 3), [round(v, 2) for v in p["zyx"]]) for p in peaks(h)]
    [((2, 2, 2), 0.9, [2.0, 2.0, 2.25])]
    """
    from scipy import ndimage

    heat = np.asarray(heat, dtype=np.float32)
    local = (heat == ndimage.maximum_filter(heat, size=3, mode="constant")) & (heat >= min_score)
    idx = np.argwhere(local)
    order = np.argsort(-heat[tuple(idx.T)], kind="stable")[:max_peaks]
    out = []
    for z, y, x in idx[order]:
        box = tuple(slice(max(0, c - 1), c + 2) for c in (z, y, x))
        w = heat[box]
        grids = np.meshgrid(*[np.arange(s.start, s.start + n) for s, n in zip(box, w.shape)], indexing="ij")
        centroid = [float((g * w).sum() / w.sum()) for g in grids]
        out.append({"zyx": centroid, "score": float(heat[z, y, x]), "index": (int(z), int(y), int(x))})
    return out
