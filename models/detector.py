"""Lesion detectors in Keras 3: CenterNet-style heat map and size heads on a U-Net backbone (3D points, 2D boxes).

Zhou et al.'s "Objects as Points" (2019) in 3D: the network predicts, for every voxel, the
probability that a lesion centre lies there (a heat map trained with the penalty-reduced focal
loss against Gaussians around the true centres) and the lesion's diameter (L1, learnt near the
centres). Detections are the local maxima of the heat map (a 3x3x3 max filter: the non-maximum
suppression of CenterNet), refined to the heat-weighted centroid of their neighbourhood.
Training draws patches (a share ``foreground_ratio`` of them around a lesion, the rest
anywhere); the model is fully convolutional and predicts whole volumes. The 2D variant
(``build_centernet2d``, boxes on radiographs) predicts each centre's box height and width
instead of a diameter (the heat Gaussian elongated with the box, as in TTFNet) and trains on
whole images. No backend-specific code: runs on TensorFlow, JAX or PyTorch. No Prefect here.
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
BOX_SCALE = 32.0  # the 2D size head predicts box height and width in units of 32 pixels
BOX_SIZE_WEIGHT = 1.0  # boxes are scored by IoU: their size weighs as much as the heat (a diameter, 0.1, does not)


def _centernet(ndim: int, input_shape, *, filters, norm: str, head: int, size_channels: int, name: str,
               **unet_params) -> keras.Model:
    from models.unet import build_unet

    conv = layers.Conv3D if ndim == 3 else layers.Conv2D
    base = build_unet(ndim, input_shape, filters=filters, norm=norm, n_classes=1, **unet_params)
    features = base.get_layer("dec0_relu1").output

    def branch(branch_name, channels, activation, bias):
        x = conv(head, 3, padding="same", activation="relu", name=f"{branch_name}_conv")(features) if head \
            else features
        return conv(channels, 1, activation=activation, bias_initializer=keras.initializers.Constant(bias),
                    dtype="float32", name=branch_name)(x)

    heat = branch("heat", 1, "sigmoid", float(np.log(HEAT_PRIOR / (1 - HEAT_PRIOR))))
    size = branch("size", size_channels, "relu", 1.0)
    out = layers.Concatenate(name="detections", dtype="float32")([heat, size])
    return keras.Model(base.input, out, name=name)


def build_centernet3d(input_shape: tuple[int, ...], *, filters=(8, 16, 32), norm: str = "batch",
                      head: int = 0, **unet_params) -> keras.Model:
    """A 3D U-Net (``models.unet``) with two heads on its last decoder block: ``heat`` (sigmoid, one channel)
    and ``size`` (diameter in cm, ReLU); the output concatenates them (channel 0 heat, 1 size). ``head`` > 0
    puts a 3x3x3 convolution of that many channels before each head's 1x1 output (CenterNet's heads; about
    a third of the training time of the smallest U-Net on a CPU), 0 none."""
    return _centernet(3, input_shape, filters=filters, norm=norm, head=head, size_channels=1, name="centernet3d",
                      **unet_params)


def build_centernet2d(input_shape: tuple[int, ...], *, filters=(16, 32, 64, 128), norm: str = "batch",
                      head: int = 32, **unet_params) -> keras.Model:
    """A 2D U-Net with CenterNet's heads for boxes: ``heat`` (sigmoid) and ``size`` (box height and width in
    units of ``BOX_SCALE`` pixels, ReLU); output channels 0 heat, 1 height, 2 width. ``head``: as in
    ``build_centernet3d`` (3x3 convolutions, cheap in 2D)."""
    return _centernet(2, input_shape, filters=filters, norm=norm, head=head, size_channels=2, name="centernet2d",
                      **unet_params)


@keras.saving.register_keras_serializable(package="medflow")
class CenterNetLoss(keras.losses.Loss):
    """Penalty-reduced focal loss on the heat map (alpha 2, beta 4; normalised by the number of centres)
    plus ``size_weight`` x L1 of the size where the target heat is above 0.5.

    ``y_true`` channels: 0 target heat (1 at each centre voxel, Gaussian around it), then the size: the
    diameter (cm) of a 3D mark, or a box's height and width (``BOX_SCALE`` pixels)."""

    def __init__(self, alpha: float = 2.0, beta: float = 4.0, size_weight: float = 0.1, name: str = "centernet",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta, self.size_weight = alpha, beta, size_weight

    def call(self, y_true, y_pred):
        heat_t, size_t = y_true[..., 0], y_true[..., 1:]
        heat_p = ops.clip(y_pred[..., 0], 1e-6, 1 - 1e-6)
        size_p = y_pred[..., 1:]
        pos = ops.cast(heat_t >= 0.999, "float32")
        axes = list(range(1, len(heat_t.shape)))
        pos_loss = ops.sum(-ops.log(heat_p) * ops.power(1 - heat_p, self.alpha) * pos, axis=axes)
        neg_loss = ops.sum(-ops.log(1 - heat_p) * ops.power(heat_p, self.alpha)
                           * ops.power(1 - heat_t, self.beta) * (1 - pos), axis=axes)
        n_pos = ops.maximum(ops.sum(pos) / ops.cast(ops.shape(pos)[0], "float32"), 1.0)
        near = ops.cast(heat_t > 0.5, "float32")
        size_loss = ops.sum(ops.sum(ops.abs(size_p - size_t), axis=-1) * near, axis=axes) / ops.maximum(ops.sum(near, axis=axes), 1.0)
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


def _augmented(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, flips: list[int], jitter: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """An image (channels added) and its target, each flip axis taken with probability 1/2 by both, and the
    image's intensity jittered (scale and offset within ``jitter``)."""
    for ax in flips:
        if rng.random() < 0.5:
            x, y = np.flip(x, axis=ax), np.flip(y, axis=ax)
    if jitter:
        x = x * (1.0 + rng.uniform(-jitter, jitter)) + rng.uniform(-jitter, jitter)
    return np.ascontiguousarray(x, dtype=np.float32)[..., None], np.ascontiguousarray(y, dtype=np.float32)


def _compiled(arch: str, shape: tuple[int, ...], params: dict, train: dict, *, size_weight: float, what: str):
    """The registered detector ``arch`` for inputs of ``shape``, compiled with the CenterNet loss; ``what``
    names the setting that fixes the shape when it is not a multiple of the model's pooling."""
    from models import get
    from models.training import make_optimizer
    from models.unet import size_multiple

    model = get(arch)((*shape, 1), **params)
    multiple = size_multiple(model)
    if any(n % multiple for n in shape):
        raise ValueError(f"{what} {list(shape)} must be a multiple of {multiple} in every axis for {arch} (its "
                         f"{int(np.log2(multiple))} pooling levels)")
    model.compile(optimizer=make_optimizer(train), loss=CenterNetLoss(size_weight=size_weight))
    return model


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
        return _augmented(image[box], target[box], rng, flips, jitter)

    return sampled_dataset(len(keys), draw, samples_per_item=samples_per_volume, batch_size=batch_size, seed=seed,
                           fixed=fixed)


def train_detector(*, loader, train_keys: list[str], val_keys: list[str], arch: str, params: dict, train: dict,
                   augment: dict, run_dir: str | Path, on_epoch=None) -> dict:
    """Build, train and save a detector (``fit_model``: checkpoints every epoch, resume, early stopping)."""
    from models.training import fit_model

    patch = tuple(int(p) for p in train["patch_size"])

    def build():
        return _compiled(arch, patch, params, train, size_weight=0.1, what="train.patch_size")

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


def box_target(shape, boxes) -> np.ndarray:
    """Target of a 2D image (H, W, 3: heat, height, width in ``BOX_SCALE`` pixels) from its boxes
    (``[r0, c0, r1, c1]`` on this grid): each box a Gaussian with sigma a sixth of its height and width (at
    least one pixel), exactly 1 at the pixel nearest its centre; overlaps take the maximum.

    >>> t = box_target((9, 9), [[1.5, 2.5, 7.5, 5.5]])
    >>> float(t[4, 4, 0]), [round(float(v) * BOX_SCALE, 1) for v in t[4, 4, 1:]]
    (1.0, [6.0, 3.0])
    """
    out = np.zeros((*shape, 3), np.float32)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    for r0, c0, r1, c1 in boxes:
        centre = np.array([(r0 + r1) / 2, (c0 + c1) / 2])
        sigma = np.maximum([(r1 - r0) / 6, (c1 - c0) / 6], 1.0)
        g = np.exp(-((rows - centre[0]) ** 2 / (2 * sigma[0] ** 2) + (cols - centre[1]) ** 2 / (2 * sigma[1] ** 2)))
        g[tuple(np.clip(np.round(centre).astype(int), 0, np.asarray(shape) - 1))] = 1.0
        g = g.astype(np.float32)
        mine = g >= out[..., 0]
        out[..., 0] = np.maximum(out[..., 0], g)
        out[..., 1] = np.where(mine, (r1 - r0) / BOX_SCALE, out[..., 1])
        out[..., 2] = np.where(mine, (c1 - c0) / BOX_SCALE, out[..., 2])
    return out


def make_box_dataset(loader: Callable[[str], tuple[np.ndarray, list]], keys: list[str], *, batch_size: int,
                     augment: dict | None = None, seed: int = 0, fixed: bool = False):
    """A ``keras.utils.PyDataset`` of whole images and their box targets; ``loader(key)`` gives a prepared
    image (1, H, W) and its boxes on that grid. Flips move the targets with the image (a box's size does not
    change); intensity jitter changes the image only."""
    from models.training import sampled_dataset

    cache: dict[int, tuple] = {}
    flips = [{"y": 0, "x": 1}[a] for a in (augment or {}).get("flip", ()) if a in ("y", "x")]
    jitter = float((augment or {}).get("intensity_jitter") or 0.0)

    def draw(i: int, rng: np.random.Generator):
        if i not in cache:
            image, boxes = loader(keys[i])
            image = np.asarray(image, dtype=np.float32)[0]
            cache[i] = (image, box_target(image.shape, boxes))
        return _augmented(*cache[i], rng, flips, jitter)

    return sampled_dataset(len(keys), draw, samples_per_item=1, batch_size=batch_size, seed=seed, fixed=fixed)


def train_box_detector(*, loader, train_keys: list[str], val_keys: list[str], arch: str, params: dict, train: dict,
                       augment: dict, run_dir: str | Path, on_epoch=None) -> dict:
    """Build, train and save a 2D box detector on whole images (``fit_model``)."""
    from models.training import fit_model

    shape = tuple(np.asarray(loader(train_keys[0])[0]).shape[1:])

    def build():
        return _compiled(arch, shape, params, train, size_weight=BOX_SIZE_WEIGHT, what="the prepared images (resize2d)")

    def datasets(initial_epoch: int):
        batch = int(train["batch_size"])
        return (make_box_dataset(loader, train_keys, batch_size=batch, augment=augment or None,
                                 seed=int(train["seed"]) + initial_epoch),
                make_box_dataset(loader, val_keys, batch_size=batch, seed=int(train["seed"]) + 10_000, fixed=True))

    return fit_model(build=build, datasets=datasets, train=train, run_dir=run_dir, on_epoch=on_epoch,
                     describe=f"{arch}: {len(train_keys)} train / {len(val_keys)} val images of {list(shape)}")


def predict_boxes(model, image: np.ndarray, *, min_score: float = 0.01, max_boxes: int = 50) -> list[dict]:
    """Boxes of a prepared image (1, H, W): the heat map's local maxima with the size predicted there,
    ``{"box": [r0, c0, r1, c1] on the image's grid, "score"}``, best first."""
    out = _predict_whole(model, np.asarray(image)[0])
    boxes = []
    for p in peaks(out[..., 0], min_score=min_score, max_peaks=max_boxes):
        h, w = (float(v) * BOX_SCALE for v in out[p["index"]][1:])
        (r, c) = p["zyx"]
        boxes.append({"box": [r - h / 2, c - w / 2, r + h / 2, c + w / 2], "score": p["score"]})
    return boxes


def predict_maps(model, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heat map and diameter map (mm) of a whole volume (padded to the model's size multiple)."""
    out = _predict_whole(model, volume)
    return out[..., 0], out[..., 1] * SIZE_SCALE


def _predict_whole(model, array: np.ndarray) -> np.ndarray:
    """The model's output channels for a whole image or volume: edge-padded to the model's size multiple,
    predicted in one batch of one, cropped back to ``array``'s shape."""
    from models.unet import size_multiple

    arr = np.asarray(array, dtype=np.float32)
    multiple = size_multiple(model)
    pad = [(0, (-n) % multiple) for n in arr.shape]
    padded = np.pad(arr, pad, mode="edge") if any(p[1] for p in pad) else arr
    out = np.asarray(model.predict(padded[None, ..., None], verbose=0)[0])
    return out[tuple(slice(0, n) for n in arr.shape)]


def peaks(heat: np.ndarray, *, min_score: float = 0.01, max_peaks: int = 50) -> list[dict]:
    """Local maxima of a heat map (3x3x3 neighbourhood; 3x3 in 2D) above ``min_score``, best first, at most
    ``max_peaks``; each ``{"zyx": heat-weighted centroid of its neighbourhood (per axis), "score", "index"}``.

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
    for index in idx[order]:
        box = tuple(slice(max(0, c - 1), c + 2) for c in index)
        w = heat[box]
        grids = np.meshgrid(*[np.arange(s.start, s.start + n) for s, n in zip(box, w.shape)], indexing="ij")
        centroid = [float((g * w).sum() / w.sum()) for g in grids]
        out.append({"zyx": centroid, "score": float(heat[tuple(index)]), "index": tuple(int(c) for c in index)})
    return out
