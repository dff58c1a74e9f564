"""Explanations: Grad-CAM without any convolution gradient, and the child process that contains a crash."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow


def _saved(tmp_path, arch, shape, n_classes, **params):
    import keras

    from models import get

    model = get(arch)(shape, n_classes=n_classes, **params)
    model.compile("adam", "categorical_crossentropy" if n_classes > 2 else "binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((8, *shape), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, n_classes, 8), n_classes) if n_classes > 2 else \
        rng.integers(0, 2, (8, 1)).astype(np.float32)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    return keras.models.load_model(tmp_path / "m.keras", compile=False)


def test_grad_cam_of_a_pooled_model_is_the_class_activation_map(tmp_path):
    """The issue's crashing case (resnet2d at 48x48, filters [4, 8], loaded back, eager Grad-CAM). Behind
    global average pooling Grad-CAM's channel weights are the head's kernel column over H*W, so the map
    must equal relu(features . kernel[:, k]) scaled to a peak of 1 (Zhou et al.'s CAM)."""
    import keras

    from models.explain import grad_cam

    model = _saved(tmp_path, "resnet2d", (48, 48, 1), 3, filters=[4, 8])
    image = np.random.default_rng(1).random((48, 48), dtype=np.float32)
    cam = grad_cam(model, image, class_index=2)
    features = keras.Model(model.inputs, model.get_layer("post_relu").output)(image[None, ..., None]).numpy()[0]
    expected = np.maximum(features @ model.layers[-1].get_weights()[0][:, 2], 0)
    from scipy import ndimage

    expected = ndimage.zoom(expected, 48 / expected.shape[0], order=1)
    assert cam.shape == (48, 48) and cam.max() == pytest.approx(1.0)
    assert np.allclose(cam, expected / expected.max(), atol=1e-4)


@pytest.mark.parametrize("arch, shape, params", [
    ("seed_cnn", (32, 32, 1), {"filters": [4, 8, 8], "dense": 16}),  # a loaded Sequential model
    ("cnn3d", (8, 16, 16, 1), {"filters": [4, 8], "pooling": "maxavg", "dense": 8}),
])
def test_grad_cam_works_for_sequential_and_3d_models(tmp_path, arch, shape, params):
    from models.explain import grad_cam

    model = _saved(tmp_path, arch, shape, 2, **params)
    cam = grad_cam(model, np.random.default_rng(2).random(shape[:-1], dtype=np.float32))
    assert cam.shape == shape[:-1] and np.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1


def test_a_crashed_explanation_child_leaves_a_record_and_the_cases(tmp_path, monkeypatch):
    from medflow.isolation import FAULT_ENV
    from models.explain import explain_cases

    model = _saved(tmp_path, "resnet2d", (32, 32, 1), 2, filters=[4])
    images = {f"k{i}": np.random.default_rng(i).random((1, 32, 32), dtype=np.float32) for i in range(2)}
    cases = [{"series_key": k, "prediction": 1} for k in images]
    out, record = explain_cases(str(tmp_path / "m.keras"), images.__getitem__, cases)
    assert record["status"] == "ok" and [c["cam"].shape for c in out] == [(32, 32)] * 2

    monkeypatch.setenv(FAULT_ENV, "models.explain:grad_cam_job=SIGSEGV")
    out, record = explain_cases(str(tmp_path / "m.keras"), images.__getitem__, cases)
    assert record["status"] == "failed" and record["signal"] == "SIGSEGV"
    assert [c["series_key"] for c in out] == ["k0", "k1"] and all("cam" not in c for c in out)
    assert np.array_equal(out[1]["image"], images["k1"][0])
