"""U-Nets, the Dice + CE loss, patch sampling and sliding-window prediction."""

from __future__ import annotations

import numpy as np
import pytest

from models.segmentation import _starts, patch_shape, predict_volume, sample_patch, train_segmenter

pytestmark = pytest.mark.tensorflow


def _cube_volumes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        image = rng.normal(0.0, 0.05, size=(16, 32, 32)).astype(np.float32)
        mask = np.zeros(image.shape, np.uint8)
        z, y, x = rng.integers(2, 10), rng.integers(4, 22), rng.integers(4, 22)
        mask[z:z + 4, y:y + 6, x:x + 6] = 1
        image[mask > 0] += 1.0
        out[f"v{i}"] = (image, mask)
    return out


def test_foreground_ratio_one_always_holds_foreground_and_zero_samples_anywhere():
    image, mask = _cube_volumes(1)["v0"]
    coords = np.argwhere(mask > 0)
    rng = np.random.default_rng(0)
    patches = [sample_patch(image, mask, (4, 8, 8), rng, foreground=coords, foreground_ratio=1.0)[1] for _ in range(50)]
    assert all(p.shape == (4, 8, 8) and p.any() for p in patches)
    anywhere = [sample_patch(image, mask, (4, 8, 8), rng, foreground=coords, foreground_ratio=0.0)[1] for _ in range(200)]
    assert sum(p.any() for p in anywhere) < 100  # the cube is a small part of the volume


def test_a_small_volume_is_padded_to_the_patch():
    image, mask = np.ones((2, 5, 5), np.float32), np.ones((2, 5, 5), np.uint8)
    x, y = sample_patch(image, mask, (4, 8, 8), np.random.default_rng(0), foreground=np.argwhere(mask), foreground_ratio=1)
    assert x.shape == y.shape == (4, 8, 8) and y.sum() == 50


def test_windows_cover_the_volume():
    assert _starts(10, 4) == [0, 2, 4, 6]
    assert _starts(11, 4) == [0, 2, 4, 6, 7]
    assert patch_shape(2, None, (9, 32, 40)) == (1, 32, 40)


@pytest.mark.parametrize("arch", ["unet2d", "unet3d"])
def test_unet_learns_cubes_and_predicts_whole_volumes(arch, tmp_path):
    import keras

    data = _cube_volumes(8)
    keys = sorted(data)
    train = {"epochs": 6, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01, "early_stopping": None,
             "reduce_lr": None, "seed": 0, "mixed_precision": False, "samples_per_volume": 8,
             "foreground_ratio": 0.8, "patch_size": [16, 16] if arch == "unet2d" else [8, 16, 16]}
    result = train_segmenter(loader=data.__getitem__, train_keys=keys[:6], val_keys=keys[6:], volume_shape=(16, 32, 32),
                             ndim=2 if arch == "unet2d" else 3, arch=arch, params={"filters": [8, 16], "norm": "batch"}, train=train, augment={"flip": ["x"]},
                             run_dir=tmp_path)
    assert result["epochs_run"] == 6
    history = result["history"]
    assert history["val_loss"][-1] < history["val_loss"][0]
    model = keras.models.load_model(tmp_path / "model.keras", compile=False)
    image, mask = data[keys[-1]]
    prob = predict_volume(model, image, two_d=arch == "unet2d", patch=None if arch == "unet2d" else (8, 16, 16))
    assert prob.shape == image.shape and 0.0 <= prob.min() and prob.max() <= 1.0
    pred = prob >= 0.5
    dice = 2 * (pred & (mask > 0)).sum() / (pred.sum() + mask.sum())
    assert dice > 0.5, dice


def test_segmentation_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from models.training import FAULT_ENV, TrainingInterrupted

    data = _cube_volumes(6)
    keys = sorted(data)
    train = {"epochs": 3, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01, "early_stopping": 5,
             "reduce_lr": None, "seed": 0, "mixed_precision": False, "samples_per_volume": 4,
             "foreground_ratio": 0.5, "patch_size": [16, 16]}
    kwargs = {"loader": data.__getitem__, "train_keys": keys[:4], "val_keys": keys[4:], "volume_shape": (16, 32, 32),
              "ndim": 2, "arch": "unet2d", "params": {"filters": [8, 16]}, "train": train, "augment": {}, "run_dir": tmp_path}
    monkeypatch.setenv(FAULT_ENV, "2")
    with pytest.raises(TrainingInterrupted):
        train_segmenter(**kwargs)
    monkeypatch.delenv(FAULT_ENV)
    result = train_segmenter(**kwargs)  # the Dice + CE loss loads back with the checkpoint
    assert result["resumed_from_epoch"] == 2 and result["epochs_trained"] == 1 and result["epochs_run"] == 3


def test_paired_zoom_keeps_the_mask_on_the_image():
    from models.segmentation import augment_pair

    image = np.zeros((1, 32, 32), np.float32)
    image[0, 20:26, 6:12] = 1.0
    mask = (image > 0).astype(np.uint8)
    for seed in range(5):
        x, y = augment_pair(image, mask, np.random.default_rng(seed), zoom=0.3)
        assert set(np.unique(y)) <= {0, 1}
        assert y.sum() > 0
        centre_mask = np.argwhere(y[0] > 0).mean(axis=0)
        centre_image = np.argwhere(x[0] > 0.5).mean(axis=0)
        assert np.abs(centre_mask - centre_image).max() < 0.6, (seed, centre_mask, centre_image)
