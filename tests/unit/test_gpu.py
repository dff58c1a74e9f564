"""On a GPU (deselected by `make test`; run with `pytest -m gpu` on a machine with one): training uses
it, with float16 compute when asked."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.tensorflow]


def test_training_runs_on_the_gpu_in_float16(tmp_path):
    from medflow.hardware import describe
    from models.training import train_classifier

    assert describe()["gpus"], "no GPU visible to TensorFlow"
    rng = np.random.default_rng(0)
    data = {f"k{i}": rng.random((8, 16, 16), dtype=np.float32) for i in range(16)}
    out = train_classifier(
        loader=data.__getitem__, train_keys=list(data)[:12], train_labels=np.arange(12) % 2,
        val_keys=list(data)[12:], val_labels=np.arange(4) % 2, input_shape=(8, 16, 16, 1), arch="cnn3d",
        params={"filters": [4, 8]}, train={"seed": 0, "optimizer": "adam", "learning_rate": 1e-3, "batch_size": 4,
                                           "epochs": 1, "early_stopping": None, "reduce_lr": None,
                                           "class_weight": "none", "mixed_precision": True},
        augment={}, run_dir=tmp_path)
    assert "GPU" in out["device"] and "mixed_float16" in out["device"]
