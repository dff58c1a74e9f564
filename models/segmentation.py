"""Segmentation training and inference: patch sampling, paired augmentation, sliding windows.

Volumes and their masks are read once from the store and kept in memory (model-ready arrays
are small). Each epoch draws ``samples_per_volume`` patches per volume; a share
``foreground_ratio`` of them is centred on a random foreground voxel, the rest fall anywhere
(so small lesions are seen often enough, and the empty background is still learnt). A 2D
U-Net gets one-slice patches. Validation uses a fixed set of patches drawn once with a
fixed seed, so validation loss is comparable between epochs. No Prefect here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def patch_shape(ndim: int, patch_size: list[int] | None, volume_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (z, y, x) patch a model of ``ndim`` spatial dimensions is trained on: one slice for a 2D
    model; whole slices/volumes when ``patch_size`` is None.

    >>> patch_shape(2, [64, 64], (40, 128, 128)), patch_shape(3, None, (32, 64, 64))
    ((1, 64, 64), (32, 64, 64))
    """
    if ndim == 2:
        return (1, *(patch_size or volume_shape[1:]))
    return tuple(patch_size or volume_shape)


def sample_patch(image: np.ndarray, mask: np.ndarray, size: tuple[int, int, int], rng: np.random.Generator, *,
                 foreground: np.ndarray | None, foreground_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``size`` from ``image`` and ``mask`` (padded when the volume is smaller).

    With probability ``foreground_ratio`` (and when ``foreground``, the voxel coordinates of
    the mask's foreground, is not empty) the patch contains a random foreground voxel at a
    random position within it; otherwise it lies anywhere.
    """
    image, mask = _pad_to(image, mask, size)
    shape = np.asarray(image.shape)
    size_arr = np.asarray(size)
    if foreground is not None and len(foreground) and rng.random() < foreground_ratio:
        centre = foreground[rng.integers(len(foreground))]
        low = np.maximum(0, centre - size_arr + 1)
        high = np.minimum(shape - size_arr, centre)
        start = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    else:
        start = np.array([rng.integers(0, n - s + 1) for n, s in zip(shape, size_arr)])
    sl = tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size_arr))
    return image[sl], mask[sl]


def _pad_to(image: np.ndarray, mask: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, max(0, int(s) - n)) for s, n in zip(size, image.shape)]
    if not any(p[1] for p in pad):
        return image, mask
    return (np.pad(image, pad, mode="constant", constant_values=float(image.min())),
            np.pad(mask, pad, mode="constant", constant_values=0))


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, flip=(), shift: int = 0,
                 rotate_deg: float = 0.0, zoom: float = 0.0, intensity_jitter: float = 0.0,
                 contrast: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The same random flips, in-plane rotation and zoom on an image patch and its mask (nearest
    for the mask); intensity and contrast jitter on the image only. ``shift`` is covered by
    patch sampling."""
    from scipy import ndimage

    axes = {"z": 0, "y": 1, "x": 2}
    for ax in flip:
        if rng.random() < 0.5:
            image, mask = np.flip(image, axis=axes[ax]), np.flip(mask, axis=axes[ax])
    if rotate_deg:
        angle = float(rng.uniform(-rotate_deg, rotate_deg))
        image = ndimage.rotate(image, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
        mask = ndimage.rotate(mask, angle, axes=(1, 2), reshape=False, order=0, mode="constant", cval=0)
    if zoom:
        from models.training import zoom_plane

        factor = float(rng.uniform(1.0 - zoom, 1.0 + zoom))
        image = zoom_plane(image, factor, order=1)
        mask = zoom_plane(mask, factor, order=0, mode="constant")
    if contrast:
        mean = float(image.mean())
        image = (image - mean) * (1.0 + float(rng.uniform(-contrast, contrast))) + mean
    if intensity_jitter:
        scale = 1.0 + float(rng.uniform(-intensity_jitter, intensity_jitter))
        image = image * scale + float(rng.uniform(-intensity_jitter, intensity_jitter))
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)


def make_patch_dataset(loader: Callable[[str], tuple[np.ndarray, np.ndarray]], keys: list[str], *, patch,
                       batch_size: int, samples_per_volume: int, foreground_ratio: float, two_d: bool,
                       augment: dict | None = None, seed: int = 0, fixed: bool = False):
    """A ``keras.utils.PyDataset`` of ``(image patches, foreground patches)`` (``models.training.sampled_dataset``).

    ``fixed=True`` draws the patches once (validation); otherwise they are drawn anew every epoch.
    """
    from models.training import sampled_dataset

    cache: dict[int, tuple] = {}

    def draw(i: int, rng: np.random.Generator):
        if i not in cache:
            image, mask = loader(keys[i])
            fg = (mask > 0).astype(np.float32)
            cache[i] = (image.astype(np.float32), fg, np.argwhere(fg > 0))
        image, fg, coords = cache[i]
        x, y = sample_patch(image, fg, patch, rng, foreground=coords, foreground_ratio=foreground_ratio)
        if augment:
            x, y = augment_pair(x, y, rng, **augment)
        x, y = (x[0], y[0]) if two_d else (x, y)
        return x[..., None].astype(np.float32), y[..., None].astype(np.float32)

    return sampled_dataset(len(keys), draw, samples_per_item=samples_per_volume, batch_size=batch_size, seed=seed,
                           fixed=fixed)


def train_segmenter(
    *,
    loader: Callable[[str], tuple[np.ndarray, np.ndarray]],
    train_keys: list[str],
    val_keys: list[str],
    volume_shape: tuple[int, int, int],
    ndim: int,
    arch: str,
    params: dict,
    train: dict,
    augment: dict,
    run_dir: str | Path,
    on_epoch: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Build, train and save a U-Net with Dice + cross-entropy; resume an interrupted run (``fit_model``)."""
    import keras

    from models import get
    from models.losses import DiceCELoss, dice_score
    from models.training import fit_model, make_optimizer

    two_d = ndim == 2
    patch = patch_shape(ndim, train.get("patch_size"), volume_shape)
    spatial = patch[1:] if two_d else patch

    def build():
        from models.unet import size_multiple

        model = get(arch)((*spatial, 1), **params)
        multiple = size_multiple(model)
        if any(int(s) % multiple for s in spatial):
            raise ValueError(f"the {arch} patch {tuple(spatial)} must be a multiple of {multiple} in every axis "
                             "(set train.patch_size, or crop_pad/resize in preprocess)")
        model.compile(optimizer=make_optimizer(train), loss=DiceCELoss(),
                      metrics=[keras.metrics.MeanMetricWrapper(dice_score, name="dice")])
        return model

    def datasets(initial_epoch: int):
        common = {"patch": patch, "batch_size": int(train["batch_size"]), "two_d": two_d,
                  "samples_per_volume": int(train["samples_per_volume"]),
                  "foreground_ratio": float(train["foreground_ratio"])}
        train_ds = make_patch_dataset(loader, train_keys, augment=augment or None,
                                      seed=int(train["seed"]) + initial_epoch, **common)
        val_ds = make_patch_dataset(loader, val_keys, seed=int(train["seed"]) + 10_000, fixed=True, **common)
        return train_ds, val_ds

    return fit_model(build=build, datasets=datasets, train=train, run_dir=run_dir, on_epoch=on_epoch,
                     describe=f"{arch}: {len(train_keys)} train / {len(val_keys)} val volumes, patches {patch}, "
                              f"{train['samples_per_volume']} per volume, foreground ratio {train['foreground_ratio']}")


def predict_volume(model, volume: np.ndarray, *, two_d: bool, patch: tuple[int, int, int] | None = None,
                   batch_size: int = 8) -> np.ndarray:
    """Foreground probabilities for a whole (Z, Y, X) volume.

    A 2D model predicts every slice (padded to its size multiple); a 3D model predicts the
    whole volume, or overlapping ``patch`` windows (half a patch apart) whose predictions are
    averaged.
    """
    from models.unet import size_multiple

    multiple = size_multiple(model)
    vol = np.asarray(volume, dtype=np.float32)
    if two_d:
        padded = _pad_multiple(vol, multiple, axes=(1, 2))
        prob = model.predict(padded[..., None], batch_size=batch_size, verbose=0)[..., 0]
        return prob[:, : vol.shape[1], : vol.shape[2]]
    if patch is None:
        padded = _pad_multiple(vol, multiple, axes=(0, 1, 2))
        prob = model.predict(padded[None, ..., None], verbose=0)[0, ..., 0]
        return prob[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    padded, _ = _pad_to(vol, vol, patch)
    starts = [_starts(n, p) for n, p in zip(padded.shape, patch)]
    total = np.zeros(padded.shape, np.float32)
    count = np.zeros(padded.shape, np.float32)
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        batch = np.stack([padded[a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in chunk])
        prob = model.predict(batch[..., None], verbose=0)[..., 0]
        for (a, b, c), p in zip(chunk, prob):
            total[a:a + patch[0], b:b + patch[1], c:c + patch[2]] += p
            count[a:a + patch[0], b:b + patch[1], c:c + patch[2]] += 1
    prob = total / np.maximum(count, 1)
    return prob[: vol.shape[0], : vol.shape[1], : vol.shape[2]]


def _starts(n: int, p: int) -> list[int]:
    """Window starts covering ``n`` with windows of ``p``, half a window apart, the last flush with the end."""
    step = max(1, p // 2)
    starts = list(range(0, max(n - p, 0) + 1, step))
    if starts[-1] != n - p:
        starts.append(n - p)
    return starts


def _pad_multiple(vol: np.ndarray, multiple: int, axes) -> np.ndarray:
    pad = [(0, 0)] * vol.ndim
    for ax in axes:
        pad[ax] = (0, (-vol.shape[ax]) % multiple)
    return np.pad(vol, pad, mode="edge") if any(p[1] for p in pad) else vol
