"""2D classifiers: the classic chest X-ray CNN layer for layer, the backbones, 2D Grad-CAM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from models import available, get, info

pytestmark = pytest.mark.tensorflow


def test_seed_cnn_is_the_classic_program_layer_for_layer():
    model = get("seed_cnn")((150, 150, 1))
    layers = [(type(layer).__name__, getattr(layer, "filters", None) or getattr(layer, "units", None))
              for layer in model.layers]
    assert layers == [("Conv2D", 32), ("MaxPooling2D", None), ("Conv2D", 64), ("MaxPooling2D", None),
                      ("Conv2D", 128), ("MaxPooling2D", None), ("Flatten", None), ("Dense", 512),
                      ("Dropout", None), ("Dense", 1)]
    assert type(model).__name__ == "Sequential"
    assert model.layers[-1].activation.__name__ == "sigmoid"
    assert model.layers[8].rate == 0.5
    assert [layer.kernel_size for layer in model.layers if hasattr(layer, "kernel_size")] == [(3, 3)] * 3
    # 320 + 18,496 + 73,856 + 17*17*128*512 + 512 + 513
    assert model.count_params() == 19_033_601


@pytest.mark.parametrize("arch", ["seed_cnn", "resnet2d", "efficientnet_b0"])
def test_2d_classifiers_end_in_softmax_for_more_than_two_classes(arch):
    model = get(arch)((64, 64, 1), n_classes=3)
    assert info(arch).ndim == 2 and info(arch).task == "classification"
    assert model.output_shape == (None, 3)
    out = model.predict(np.random.default_rng(0).random((2, 64, 64, 1), dtype=np.float32), verbose=0)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_registry_knows_task_and_dimensionality():
    assert available("segmentation") == ["unet2d", "unet3d"]
    assert {info(a).ndim for a in available("classification")} == {2, 3}
    with pytest.raises(KeyError, match="unknown model"):
        info("resnet9000")


def test_stages_never_compare_task_or_model_names():
    """The seam: tasks/ and flows/ ask the task kind, never `== "segmentation"` or a model name."""
    root = Path(__file__).resolve().parents[2]
    names = ["classification", "segmentation", *available()]
    pattern = re.compile(r"""[=!]=\s*["'](%s)["']|["'](%s)["']\s*[=!]=""" % ("|".join(names), "|".join(names)))
    offenders = [f"{p.relative_to(root)}:{i}" for folder in ("tasks", "flows") for p in (root / folder).glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_training_runs_tensorflow_with_onednn():
    """A dependency update must not silently drop TensorFlow's oneDNN CPU kernels (several times slower)."""
    from models.training import accelerator, tensorflow_onednn_enabled

    assert tensorflow_onednn_enabled()
    assert "oneDNN on" in accelerator()


@pytest.mark.slow
def test_grad_cam_2d_peaks_on_the_bright_square(tmp_path):
    import keras

    from models.explain import grad_cam
    from models.training import train_classifier

    rng = np.random.default_rng(0)
    data, labels, squares = {}, [], {}
    for i in range(96):
        image = rng.normal(0.3, 0.05, size=(1, 32, 32)).astype(np.float32)
        if i % 2:
            y, x = (int(v) for v in rng.integers(3, 24, size=2))
            image[0, y:y + 5, x:x + 5] = 1.0
            squares[f"k{i}"] = (y + 2, x + 2)
        data[f"k{i}"] = image
        labels.append(i % 2)
    keys, labels = list(data), np.array(labels)
    train_classifier(
        loader=data.__getitem__, train_keys=keys[:72], train_labels=labels[:72], val_keys=keys[72:],
        val_labels=labels[72:], input_shape=(32, 32, 1), arch="resnet2d",
        params={"filters": [8, 16], "stem_stride": 1, "pooling": "max", "dropout": 0.0},
        train={"seed": 0, "optimizer": "adam", "learning_rate": 0.005, "batch_size": 8, "epochs": 10,
               "early_stopping": None, "reduce_lr": None, "class_weight": "balanced", "mixed_precision": False},
        augment={}, run_dir=tmp_path,
    )
    model = keras.models.load_model(tmp_path / "model.keras", compile=False)
    hits = 0
    positives = [k for k in keys[72:] if k in squares]
    for key in positives:
        cam = grad_cam(model, data[key][0])
        assert cam.shape == (32, 32) and cam.max() == pytest.approx(1.0)
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        hits += max(abs(peak[0] - squares[key][0]), abs(peak[1] - squares[key][1])) <= 4
    assert hits >= len(positives) - 1, f"{hits} of {len(positives)} peaks on the square"
