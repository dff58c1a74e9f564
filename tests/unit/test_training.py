"""Training: class weights, and resume after an interruption (the fault hook)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.training import FAULT_ENV, TrainingInterrupted, read_history, smooth_losses, train_classifier

pytestmark = [pytest.mark.slow, pytest.mark.tensorflow]


def _blobs(n=24, seed=0):
    """(8, 16, 16) volumes; positives hold a bright 3x3x3 cube somewhere."""
    rng = np.random.default_rng(seed)
    data, labels = {}, []
    for i in range(n):
        vol = rng.normal(0.3, 0.05, size=(8, 16, 16)).astype(np.float32)
        lab = i % 2
        if lab:
            z, y, x = rng.integers(1, 5), rng.integers(1, 12), rng.integers(1, 12)
            vol[z:z + 3, y:y + 3, x:x + 3] = 1.0
        data[f"k{i}"] = vol
        labels.append(lab)
    return data, np.array(labels)


def _train(run_dir, data, labels, epochs=8, deterministic=False, smoothing=0.5):
    keys = sorted(data, key=lambda k: int(k[1:]))
    return train_classifier(
        loader=data.__getitem__, train_keys=keys[:16], train_labels=labels[:16], val_keys=keys[16:],
        val_labels=labels[16:], input_shape=(8, 16, 16, 1), arch="cnn3d", params={"filters": [4, 8]},
        train={"seed": 0, "optimizer": "adam", "learning_rate": 0.01, "batch_size": 4, "epochs": epochs,
               "early_stopping": None, "reduce_lr": 3, "class_weight": "balanced", "mixed_precision": False,
               "deterministic": deterministic, "val_smoothing": smoothing},
        augment={}, run_dir=run_dir,
    )


def test_interrupted_training_resumes_from_last_epoch(tmp_path, monkeypatch):
    data, labels = _blobs()
    whole = _train(tmp_path / "whole", data, labels)
    assert whole["epochs_trained"] == 8 and whole["resumed_from_epoch"] == 0

    monkeypatch.setenv(FAULT_ENV, "3")
    with pytest.raises(TrainingInterrupted):
        _train(tmp_path / "cut", data, labels)
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["epoch"] == 3
    monkeypatch.delenv(FAULT_ENV)

    resumed = _train(tmp_path / "cut", data, labels)
    assert resumed["resumed_from_epoch"] == 3
    assert resumed["epochs_trained"] == 5  # only the remaining epochs
    assert resumed["epochs_run"] == 8
    history = read_history(tmp_path / "cut" / "history.csv")
    assert len(history["loss"]) == 8
    # the smoothed validation loss runs on across the cut (restarting it at epoch 4 would give that epoch's raw loss)
    assert history["val_loss_smooth"] == pytest.approx(smooth_losses(history["val_loss"], 0.5))
    assert history["val_loss_smooth"][3] != pytest.approx(history["val_loss"][3])
    assert resumed["selected_by"] == "val_loss_smooth"
    assert resumed["best_epoch"] == int(np.argmin(history["val_loss_smooth"])) + 1
    # same quality as the uninterrupted run (the data order differs after the restart)
    assert resumed["history"]["val_loss"][-1] == pytest.approx(whole["history"]["val_loss"][-1], abs=0.15)
    assert resumed["history"]["val_auc"][-1] >= whole["history"]["val_auc"][-1] - 0.1

    again = _train(tmp_path / "cut", data, labels)  # a finished run is not trained again
    assert again["epochs_trained"] == 0


def test_grad_cam_points_at_the_finding(tmp_path):
    import keras

    from models.explain import grad_cam

    data, labels = _blobs(n=40, seed=1)
    keys = sorted(data, key=lambda k: int(k[1:]))
    from models.training import train_classifier

    train_classifier(
        loader=data.__getitem__, train_keys=keys[:32], train_labels=labels[:32], val_keys=keys[32:],
        val_labels=labels[32:], input_shape=(8, 16, 16, 1), arch="cnn3d", params={"filters": [8, 16]},
        train={"seed": 0, "optimizer": "adam", "learning_rate": 0.01, "batch_size": 4, "epochs": 12,
               "early_stopping": None, "reduce_lr": None, "class_weight": "balanced", "mixed_precision": False},
        augment={}, run_dir=tmp_path,
    )
    model = keras.models.load_model(tmp_path / "model.keras", compile=False)
    hits = 0
    positives = [k for k in keys[32:] if labels[int(k[1:])] == 1]
    for key in positives:
        volume = data[key]
        cam = grad_cam(model, volume)
        assert cam.shape == volume.shape and cam.max() == pytest.approx(1.0)
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        blob = np.argwhere(volume == 1.0).mean(axis=0)
        hits += np.abs(np.asarray(peak) - blob).max() <= 3
    assert hits >= len(positives) - 1  # the heat map sits on the bright cube


def test_a_damaged_checkpoint_never_bricks_the_run(tmp_path, monkeypatch, caplog):
    """A kill during a checkpoint write used to leave a 0-byte last.keras that every resume failed on."""
    data, labels = _blobs()
    monkeypatch.setenv(FAULT_ENV, "2")
    with pytest.raises(TrainingInterrupted):
        _train(tmp_path, data, labels, epochs=4)
    monkeypatch.delenv(FAULT_ENV)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["best.keras", "last.keras"]  # written by rename: no temporary file left behind
    (tmp_path / "checkpoints" / "last.keras").write_bytes(b"")  # what an in-place write killed midway left
    with caplog.at_level("WARNING", logger="models.training"):
        result = _train(tmp_path, data, labels, epochs=4)
    assert "cannot resume" in caplog.text and "training afresh" in caplog.text
    assert result["resumed_from_epoch"] == 0 and result["epochs_trained"] == 4 and result["epochs_run"] == 4
    assert (tmp_path / "model.keras").stat().st_size > 0


_DETERMINISTIC_RUN = """
import json, logging, sys, tempfile
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {root!r})
from tests.unit.test_training import _blobs, _train
from models.training import predict
data, labels = _blobs()
with tempfile.TemporaryDirectory() as tmp:
    _train(tmp, data, labels, epochs=3, deterministic=True)
    print(json.dumps(predict(tmp + "/model.keras", data.__getitem__, sorted(data), batch_size=4).tolist()))
"""


def test_deterministic_training_gives_the_same_predictions_in_two_processes(tmp_path):
    """``train.deterministic``: two fresh processes (TensorFlow's op determinism is per process) train
    the same model on the same data and predict bit-identical scores."""
    import subprocess
    import sys
    from pathlib import Path

    script = _DETERMINISTIC_RUN.format(root=str(Path(__file__).resolve().parents[2]))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        assert "deterministic ops on" in run.stderr
    scores = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    assert len(scores[0]) == 24 and len(set(scores[0])) > 1  # a trained model: the scores vary
    assert scores[0] == scores[1]


def test_initial_weights_do_not_depend_on_other_threads_drawing_from_random():
    """Keras draws initializer seeds from Python's global ``random``; a Prefect process has other threads
    that draw from it too. Built under ``keras_seed_draws`` the weights are the same whatever they do."""
    import random
    import threading

    import keras

    from models import get
    from models.training import keras_seed_draws

    def weights():
        return get("cnn3d")((8, 16, 16, 1), filters=[4, 8], dropout=0.2).get_weights()

    keras.utils.set_random_seed(7)
    random.random()  # another thread's draw between the seeding and the build...
    unguarded = weights()
    keras.utils.set_random_seed(7)
    assert not all(np.array_equal(a, b) for a, b in zip(unguarded, weights()))  # ...changes the model

    with keras_seed_draws(7):
        quiet = weights()
    stop = threading.Event()
    noise = threading.Thread(target=lambda: [random.random() for _ in iter(stop.is_set, True)], daemon=True)
    noise.start()
    try:
        with keras_seed_draws(7):
            busy = weights()
    finally:
        stop.set()
        noise.join()
    assert all(np.array_equal(a, b) for a, b in zip(quiet, busy))


def test_dead_dense_units_are_counted_on_the_given_cases_and_warned_of(tmp_path):
    import keras

    from medflow.metrics import dead_units_warning
    from models.training import dense_activity, save_model_atomic

    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(inputs)
    hidden = keras.layers.Dense(10, activation="relu", name="hidden")
    x = hidden(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    kernel, bias = hidden.get_weights()
    bias[:7] = -100.0  # 7 of 10 units can never fire on inputs in [0, 1]
    hidden.set_weights([np.zeros_like(kernel) + 0.1, bias])
    path = save_model_atomic(model, tmp_path / "m.keras")
    data = {f"k{i}": np.random.default_rng(i).random((1, 4, 4), dtype=np.float32) for i in range(5)}
    activity = dense_activity(path, data.__getitem__, list(data), batch_size=2)
    assert activity == {"hidden": {"units": 10, "never_active": 7}}
    assert "7 of the 10 units" in dead_units_warning(activity)
    bias[:7] = 0.0
    hidden.set_weights([np.zeros_like(kernel) + 0.1, bias])
    path = save_model_atomic(model, tmp_path / "m2.keras")
    assert dense_activity(path, data.__getitem__, list(data), batch_size=2)["hidden"]["never_active"] == 0
