"""train.distribute: mirrored over two logical CPU devices computes what one device does at the same
global batch, and checkpoints move between the two. Each run is a fresh process: logical devices
must be set before TensorFlow starts."""

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
print(json.dumps({{"loss": out["history"]["loss"], "val_loss": out["history"]["val_loss"], "device": out["device"]}}))
"""


def _train(run_dir, *, devices, distribute, epochs):
    script = _RUN.format(root=str(ROOT), devices=devices, distribute=distribute, epochs=epochs, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_trains_one_model_over_two_devices(tmp_path):
    two = _train(tmp_path / "two", devices=2, distribute="mirrored", epochs=3)
    assert "mirrored over 2 replica(s)" in two["device"]
    assert len(two["loss"]) == 3 and two["loss"][-1] < 0.8 * two["loss"][0]  # it learnt the cubes


def test_a_mirrored_checkpoint_resumes_on_one_device_and_the_other_way_round(tmp_path):
    """Stopped after epoch 2 under one set-up, resumed to epoch 4 under the other: the checkpoint loads,
    the history holds all four epochs, and the run goes on learning."""
    for first, then in [((2, "mirrored"), (1, "none")), ((1, "none"), (2, "mirrored"))]:
        run = tmp_path / f"{first[1]}-then-{then[1]}"
        before = _train(run, devices=first[0], distribute=first[1], epochs=2)
        (run / "training.json").unlink()  # as if stopped after epoch 2: resume to 4
        (run / "model.keras").unlink()
        resumed = _train(run, devices=then[0], distribute=then[1], epochs=4)
        assert resumed["loss"][:2] == before["loss"]  # epochs 1-2 from the first set-up, 3-4 resumed
        assert len(resumed["loss"]) == 4 and resumed["loss"][3] < before["loss"][0]
        assert ("replica" in resumed["device"]) == (then[1] == "mirrored")
