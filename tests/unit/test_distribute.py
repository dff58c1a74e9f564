"""train.distribute: mirrored over two logical CPU devices, and multi_worker over two worker processes
on loopback, compute what one device does at the same global batch; checkpoints move between set-ups.
Each run is a fresh process: logical devices and TF_CONFIG must be set before TensorFlow starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]
ROOT = Path(__file__).resolve().parents[2]

_RUN = """
import json, sys
sys.path.insert(0, {root!r})
import tensorflow as tf
if {devices} > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {devices})
import numpy as np
from models.training import train_classifier
rng = np.random.default_rng(0)
data = {{f"k{{i}}": rng.random((8, 16, 16), dtype=np.float32) for i in range(24)}}
labels = np.array([i % 2 for i in range(24)])
for i in range(1, 24, 2):
    data[f"k{{i}}"][2:5, 4:8, 4:8] += 1.0
keys = list(data)
out = train_classifier(
    loader=data.__getitem__, train_keys=keys[:16], train_labels=labels[:16], val_keys=keys[16:],
    val_labels=labels[16:], input_shape=(8, 16, 16, 1), arch="cnn3d", params={{"filters": [4, 8]}},
    train={{"seed": 0, "optimizer": "sgd", "learning_rate": 0.05, "batch_size": 8, "epochs": {epochs},
           "early_stopping": None, "reduce_lr": None, "class_weight": "none", "mixed_precision": False,
           "distribute": {distribute!r}}},
    augment={{"flip": ["x"], "intensity_jitter": 0.05}}, run_dir={run_dir!r})
print(json.dumps({{"loss": out["history"]["loss"], "val_loss": out["history"]["val_loss"], "device": out["device"],
                  "workers": out.get("workers"), "equal": out.get("worker_weights_equal")}}))
"""


def _train(run_dir, *, devices, distribute, epochs):
    script = _RUN.format(root=str(ROOT), devices=devices, distribute=distribute, epochs=epochs, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_on_two_devices_equals_one_device_at_the_same_global_batch(tmp_path):
    one = _train(tmp_path / "one", devices=1, distribute="none", epochs=3)
    two = _train(tmp_path / "two", devices=2, distribute="mirrored", epochs=3)
    assert "mirrored over 2 replica(s)" in two["device"] and "replica" not in one["device"]
    assert len(one["loss"]) == len(two["loss"]) == 3
    # 3 epochs x 2 steps with shuffling, augmentation and BatchNorm: the same losses within 1e-4
    assert max(abs(a - b) for a, b in zip(one["loss"] + one["val_loss"], two["loss"] + two["val_loss"])) < 1e-4
    assert two["loss"][-1] < 0.8 * two["loss"][0]  # it trained: the comparison is not of constants


def test_a_mirrored_checkpoint_resumes_on_one_device_and_the_other_way_round(tmp_path):
    """Stopped after epoch 2 under one set-up, resumed to epoch 4 under the other: the checkpoint loads and
    the resumed run ends with the losses of an uninterrupted one-device run."""
    straight = _train(tmp_path / "straight", devices=1, distribute="none", epochs=4)
    for first, then in [((2, "mirrored"), (1, "none")), ((1, "none"), (2, "mirrored"))]:
        run = tmp_path / f"{first[1]}-then-{then[1]}"
        _train(run, devices=first[0], distribute=first[1], epochs=2)
        (run / "training.json").unlink()  # as if stopped after epoch 2: resume to 4
        (run / "model.keras").unlink()
        resumed = _train(run, devices=then[0], distribute=then[1], epochs=4)
        assert ("replica" in resumed["device"]) == (then[1] == "mirrored")
        assert len(resumed["loss"]) == 4
        assert max(abs(a - b) for a, b in zip(straight["loss"], resumed["loss"])) < 1e-4, (straight, resumed)


def test_two_workers_on_loopback_train_one_model_and_end_with_the_same_weights(tmp_path):
    one = _train(tmp_path / "one", devices=1, distribute="none", epochs=3)
    workers = _train(tmp_path / "workers", devices=1, distribute="multi_worker", epochs=3)
    assert workers["workers"] == 2 and workers["equal"] is True  # bit-equal weights in both processes
    assert "multi_worker over 2 replica(s)" in workers["device"]
    assert max(abs(a - b) for a, b in zip(one["loss"] + one["val_loss"], workers["loss"] + workers["val_loss"])) < 1e-4
    assert (tmp_path / "workers" / "model.keras").exists()
    assert not list((tmp_path / "workers").glob("medflow-workers-*"))  # the other worker's folder is gone
