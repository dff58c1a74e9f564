"""Training and inference helpers: a streaming input pipeline from the store, augmentation,
class weights, checkpoints, early stopping and resume. No Prefect here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medflow.runs import write_text_atomic

logger = logging.getLogger(__name__)


def _keras():
    import keras

    return keras


# -------------------------------------------------------------------- augmentation
def zoom_plane(volume: np.ndarray, factor: float, *, order: int, mode: str = "nearest", cval: float = 0.0
               ) -> np.ndarray:
    """Scale every (Y, X) plane of a (Z, Y, X) volume by ``factor`` about its centre, keeping the shape.

    >>> zoom_plane(np.eye(5)[None], 1.0, order=0).tolist() == np.eye(5)[None].tolist()
    True
    """
    from scipy import ndimage

    centre = (np.asarray(volume.shape[1:], dtype=float) - 1) / 2
    matrix = np.diag([1.0, 1.0 / factor, 1.0 / factor])
    offset = np.concatenate([[0.0], centre - centre / factor])
    return ndimage.affine_transform(volume, matrix, offset=offset, order=order, mode=mode, cval=cval)


def augment_volume(volume: np.ndarray, rng: np.random.Generator, *, flip=(), shift: int = 0,
                   rotate_deg: float = 0.0, zoom: float = 0.0, intensity_jitter: float = 0.0,
                   contrast: float = 0.0) -> np.ndarray:
    """Random flips, in-plane rotation, zoom and shift, and intensity jitter of a (Z, Y, X) volume.

    A 2D image is a volume of one slice. ``zoom`` scales the plane by a factor in
    [1 - zoom, 1 + zoom] about its centre; ``contrast`` scales intensities about their mean
    by a factor in [1 - contrast, 1 + contrast]; ``intensity_jitter`` scales and offsets them
    (brightness).

    >>> v = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> augment_volume(v, np.random.default_rng(0)).tolist() == v.tolist()
    True
    """
    from scipy import ndimage

    out = volume
    axes = {"z": 0, "y": 1, "x": 2}
    for ax in flip:
        if rng.random() < 0.5:
            out = np.flip(out, axis=axes[ax])
    if rotate_deg:
        angle = float(rng.uniform(-rotate_deg, rotate_deg))
        out = ndimage.rotate(out, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
    if zoom:
        out = zoom_plane(out, float(rng.uniform(1.0 - zoom, 1.0 + zoom)), order=1)
    if shift:
        dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
        out = ndimage.shift(out, (0, dy, dx), order=0, mode="nearest")
    if contrast:
        mean = float(out.mean())
        out = (out - mean) * (1.0 + float(rng.uniform(-contrast, contrast))) + mean
    if intensity_jitter:
        scale = 1.0 + float(rng.uniform(-intensity_jitter, intensity_jitter))
        offset = float(rng.uniform(-intensity_jitter, intensity_jitter))
        out = out * scale + offset
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------- input data
def encode_labels(labels, n_classes: int) -> np.ndarray:
    """Training targets: a (N, 1) column of 0/1 for two classes, one-hot (N, K) for more.

    >>> encode_labels([0, 2], 3).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    y = np.asarray(labels, dtype=np.int64)
    if n_classes == 2:
        return y.astype(np.float32)[:, None]
    return np.eye(n_classes, dtype=np.float32)[y]


def batch_members(order: np.ndarray, idx: int, batch_size: int, *, fill_small_last: bool) -> np.ndarray:
    """Positions in ``order`` of batch ``idx``.

    With ``fill_small_last`` (training), a last batch under half the batch size is filled up
    from the start of this epoch's order: BatchNorm's moving statistics take a tenth of every
    batch, and a batch of a handful of cases (perhaps of one class) shifts them enough to make
    validation erratic.

    >>> order = np.arange(10)
    >>> batch_members(order, 2, 4, fill_small_last=False).tolist(), batch_members(order, 2, 4, fill_small_last=True).tolist()
    ([8, 9], [8, 9])
    >>> batch_members(np.arange(9), 2, 4, fill_small_last=True).tolist()
    [8, 0, 1, 2]
    """
    sel = order[idx * batch_size:(idx + 1) * batch_size]
    if fill_small_last and len(sel) < batch_size / 2 and len(order) >= batch_size:
        sel = np.concatenate([sel, order[:batch_size - len(sel)]])
    return sel


def make_dataset(loader: Callable[[str], np.ndarray], keys: list[str], labels: np.ndarray | None, *,
                 batch_size: int, input_shape: tuple[int, ...] | None = None, n_classes: int = 2,
                 augment: dict | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0):
    """A ``keras.utils.PyDataset`` over store arrays, read on first use and kept in memory.

    Model-ready arrays are small, so they are read once from the store and cached (reading
    and preprocessing every epoch competes with the model for the CPU). Arrays are stored as
    (Z, Y, X) (a 2D image as one slice) and augmented as volumes; each is then reshaped to
    ``input_shape`` without its channel axis ((H, W) for a 2D model).

    An epoch's order is drawn from a generator seeded by (``seed``, epoch) and a batch's
    augmentation from one seeded by (``seed``, epoch, batch): a batch is the same whoever reads
    it and in whatever order. Keras reads two batches ahead to learn their shapes, and
    ``tf.distribute`` reads them through another pipeline, once more before the first epoch; with
    one stream of draws both changed what the model was trained on. ``set_epoch`` (called by
    ``fit_model`` as each epoch begins) says which epoch it is; ``epoch`` is the first (a resumed
    run continues the same sequence). The dataset orders itself (``orders_itself``), so ``fit`` is
    told not to shuffle its batches (Keras does that with Python's global ``random``, which other
    threads of a Prefect process draw from too).
    """
    keras = _keras()
    targets = encode_labels(labels, n_classes) if labels is not None else None

    class VolumeDataset(keras.utils.PyDataset):
        orders_itself = True

        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.cache: dict[str, np.ndarray] = {}
            self.set_epoch(epoch)

        def set_epoch(self, number: int):
            self.epoch = number
            self.order = self._order()

        def _order(self):
            order = np.arange(len(keys))
            if shuffle:
                np.random.default_rng([seed, self.epoch]).shuffle(order)
            return order

        def __len__(self):
            return math.ceil(len(keys) / batch_size)

        def _get(self, key):
            if key not in self.cache:
                self.cache[key] = loader(key)
            return self.cache[key]

        def __getitem__(self, idx):
            sel = batch_members(self.order, idx, batch_size, fill_small_last=shuffle)
            vols = [self._get(keys[i]) for i in sel]
            if augment:
                rng = np.random.default_rng([seed, self.epoch, idx])
                vols = [augment_volume(v, rng, **augment) for v in vols]
            x = np.stack(vols).astype(np.float32, copy=False)  # a store array is float32 already
            if input_shape is not None:
                x = x.reshape((len(vols), *input_shape[:-1]))
            x = x[..., None]
            if targets is None:
                return (x,)
            return x, targets[sel]

    return VolumeDataset()


def sampled_dataset(n_items: int, draw: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]], *,
                    samples_per_item: int, batch_size: int, seed: int = 0, fixed: bool = False):
    """A ``keras.utils.PyDataset`` of batches of ``draw(item, rng)`` pairs: each of ``n_items`` items is drawn
    ``samples_per_item`` times per epoch, in a shuffled order (patches of volumes, for segmentation and
    detection). ``fixed=True`` draws each batch once and keeps it (validation: comparable between epochs).
    """
    keras = _keras()

    class SampledDataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.items = np.repeat(np.arange(n_items), samples_per_item)
            self.rng.shuffle(self.items)
            self.frozen: dict[int, tuple] = {}

        def __len__(self):
            return math.ceil(len(self.items) / batch_size)

        def _batch(self, idx):
            pairs = [draw(int(i), self.rng) for i in self.items[idx * batch_size:(idx + 1) * batch_size]]
            return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])

        def __getitem__(self, idx):
            if not fixed:
                return self._batch(idx)
            if idx not in self.frozen:
                self.frozen[idx] = self._batch(idx)
            return self.frozen[idx]

        def on_epoch_end(self):
            if not fixed:
                self.rng.shuffle(self.items)

    return SampledDataset()


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    """``balanced`` weights (scikit-learn) or None.

    >>> class_weights(np.array([0, 0, 0, 1]), "balanced")
    {0: 0.6666666666666666, 1: 2.0}
    """
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def accelerator() -> str:
    """A short description of the device Keras will train on."""
    keras = _keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return f"tensorflow, {len(gpus)} GPU(s)"
        return f"tensorflow, CPU (oneDNN {'on' if tensorflow_onednn_enabled() else 'off'})"
    if backend == "torch":
        import torch

        return "torch, GPU" if torch.cuda.is_available() else "torch, CPU"
    if backend == "jax":
        import jax

        return f"jax, {jax.default_backend()}"
    return backend


def distribution_strategy(train: dict):
    """The ``tf.distribute`` strategy of ``train.distribute`` (None for ``none``).

    ``mirrored``: one replica per GPU, or per logical CPU device where there is no GPU (tests make
    two with ``tf.config.set_logical_device_configuration``); the spec's ``batch_size`` is the
    global batch, split across replicas, and their gradients are summed. ``multi_worker``:
    ``MultiWorkerMirroredStrategy`` in a worker that ``models.multiworker`` started with ``TF_CONFIG``.
    """
    mode = train.get("distribute") or "none"
    if mode == "none":
        return None
    keras = _keras()
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"Received train.distribute={mode!r} with Keras on {keras.backend.backend()}; "
                         "distributed training needs the TensorFlow backend (KERAS_BACKEND=tensorflow).")
    import tensorflow as tf

    if mode == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if mode == "multi_worker":
        from models.multiworker import in_worker

        if not in_worker():
            raise ValueError("Received train.distribute='multi_worker' in a process without TF_CONFIG; the "
                             "classification and signal kinds start their workers (models.multiworker)")
        from models.multiworker import patch_keras_reduction

        patch_keras_reduction()
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Received train.distribute={mode!r}, expected 'none', 'mirrored' or 'multi_worker'.")


def synchronize_batch_norm(model) -> None:
    """BatchNormalization over the global batch (all replicas) rather than each replica's share, so a
    distributed step computes what the one-device step does."""
    keras = _keras()
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def as_global_batches(dataset, batch_size: int):
    """A ``tf.data.Dataset`` of ``dataset``'s batches (a ``PyDataset`` of (x, y) pairs), unbatched and
    batched again by the global ``batch_size``, so that ``tf.distribute`` knows the global batch and
    splits each one across replicas (given a ``PyDataset`` directly, a strategy fed its replicas
    other samples than a one-device run gets). Augmentation and shuffling stay the ``PyDataset``'s:
    the generator runs its epoch hook."""
    import copy

    import tensorflow as tf

    first = copy.deepcopy(dataset)[0]  # the signature, from a copy: augmenting draws from the dataset's RNG

    def samples():
        for i in range(len(dataset)):
            for sample in zip(*dataset[i]):
                yield sample
        dataset.on_epoch_end()

    signature = tuple(tf.TensorSpec(part.shape[1:], tf.as_dtype(part.dtype)) for part in first)
    return tf.data.Dataset.from_generator(samples, output_signature=signature).batch(batch_size)


def tensorflow_onednn_enabled() -> bool:
    """Whether TensorFlow in this process runs its oneDNN CPU kernels (decided when it was imported)."""
    from medflow.hardware import onednn_enabled

    return onednn_enabled()


# -------------------------------------------------------------------------- train
FAULT_ENV = "MEDFLOW_FAULT_AFTER_EPOCH"


class TrainingInterrupted(RuntimeError):
    """Raised by the fault hook (``MEDFLOW_FAULT_AFTER_EPOCH``) to simulate a crash."""


SMOOTH_KEY = "val_loss_smooth"


def smooth_losses(losses, smoothing: float) -> list[float]:
    """The exponential moving average that early stopping and the best checkpoint follow.

    >>> smooth_losses([1.0, 0.5, 2.0, 0.4], 0.5)
    [1.0, 0.75, 1.375, 0.8875]
    """
    out: list[float] = []
    for v in losses:
        out.append(float(v) if not out else smoothing * out[-1] + (1.0 - smoothing) * float(v))
    return out


def _smoother(keras, smoothing: float):
    """Adds ``val_loss_smooth`` to each epoch's logs (first in the callback list, so that the checkpoint, early
    stopping, the learning-rate drops and ``history.csv`` all see it)."""

    class Smoother(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.value: float | None = None

        def on_epoch_end(self, epoch, logs=None):
            if logs is None or "val_loss" not in logs:
                return
            v = float(logs["val_loss"])
            self.value = v if self.value is None else smoothing * self.value + (1.0 - smoothing) * v
            logs[SMOOTH_KEY] = self.value

    return Smoother()


def _atomic_checkpoint(keras, path: Path, *, best_only: bool, monitor: str = "val_loss"):
    """Saves the model (with its optimizer state) after every epoch, or when validation loss improves,
    through ``save_model_atomic``: a kill during the write leaves the previous checkpoint whole.

    Keras' ModelCheckpoint writes in place, and a kill during that write left a 0-byte file that
    every later resume failed on.
    """

    class AtomicCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = float("inf")

        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get(monitor, float("nan")))
            if best_only:
                if not loss < self.best:
                    return
                self.best = loss
            save_model_atomic(self.model, path)

    return AtomicCheckpoint()


def _epoch_setter(keras, dataset):
    """Tells ``dataset`` the epoch as it begins (the number Keras counts, ``initial_epoch`` included)."""

    class EpochSetter(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            dataset.set_epoch(epoch)

    return EpochSetter()


def _resume_callback(keras, state_path: Path, early: object | None, plateau: object | None,
                     smoother: object | None = None, checkpoint: object | None = None):
    """Persists what resuming needs beyond the model file, and restores it at train begin.

    ``checkpoints/last.keras`` (model and optimizer state, written by an atomic checkpoint
    earlier in the callback list) is saved first; ``state.json`` is written after it and is
    the commit point of an epoch. Early-stopping and learning-rate-plateau counters are kept
    here so that a resumed run stops exactly where an uninterrupted one would.
    """
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)

    class ResumeState(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if not state_path.exists():
                return
            state = json.loads(state_path.read_text())
            if early is not None and "early_stopping" in state:
                es = state["early_stopping"]
                early.wait, early.best, early.best_epoch = es["wait"], es["best"], es["best_epoch"]
                best = state_path.parent / "checkpoints" / "best.keras"
                if early.restore_best_weights and best.exists():
                    early.best_weights = keras.models.load_model(best, compile=False).get_weights()
            if plateau is not None and "reduce_lr" in state:
                rl = state["reduce_lr"]
                plateau.wait, plateau.best, plateau.cooldown_counter = rl["wait"], rl["best"], rl["cooldown"]
            if smoother is not None and state.get("val_loss_smooth") is not None:
                smoother.value = float(state["val_loss_smooth"])
            if checkpoint is not None and "best_checkpoint" in state:
                checkpoint.best = float(state["best_checkpoint"])

        def on_epoch_end(self, epoch, logs=None):
            state = {"epoch": epoch + 1}
            if early is not None:
                state["early_stopping"] = {"wait": int(early.wait), "best": float(early.best),
                                           "best_epoch": int(early.best_epoch)}
            if plateau is not None:
                state["reduce_lr"] = {"wait": int(plateau.wait), "best": float(plateau.best),
                                      "cooldown": int(plateau.cooldown_counter)}
            if smoother is not None:
                state["val_loss_smooth"] = smoother.value
            if checkpoint is not None:
                state["best_checkpoint"] = float(checkpoint.best)
            write_text_atomic(state_path, json.dumps(state))
            if fault_after and epoch + 1 == fault_after:
                raise TrainingInterrupted(f"fault hook {FAULT_ENV}={fault_after}: stopping after epoch {epoch + 1}")

    return ResumeState()


def _tensorboard(keras, run_dir: Path) -> list:
    """Keras' TensorBoard callback writing per-epoch losses and metrics under ``run_dir/tensorboard``
    (the TensorFlow backend writes event files; other backends skip it with a note)."""
    if keras.backend.backend() != "tensorflow":
        logger.info("no TensorBoard curves: the %s backend cannot write them", keras.backend.backend())
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False, histogram_freq=0,
                                        update_freq="epoch")]


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch metrics from ``history.csv`` (all attempts of a resumed run)."""
    import csv

    if not path.exists():
        return {}
    rows = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            rows[int(row.pop("epoch"))] = row  # a re-done epoch replaces the interrupted one
    history: dict[str, list[float]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            history.setdefault(key, []).append(float(value))
    return history


def train_classifier(
    *,
    loader: Callable[[str], np.ndarray],
    train_keys: list[str],
    train_labels: np.ndarray,
    val_keys: list[str],
    val_labels: np.ndarray,
    input_shape: tuple[int, ...],
    arch: str,
    params: dict,
    train: dict,
    augment: dict,
    run_dir: str | Path,
    n_classes: int = 2,
    on_epoch: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Build, train and save a classifier; resume from ``run_dir`` if it holds an interrupted run.

    Two classes: one sigmoid unit and binary cross-entropy; K > 2: K softmax units and
    categorical cross-entropy on one-hot targets. ``input_shape`` is the model's input, spatial
    dimensions then channels ((Z, Y, X, 1) or (H, W, 1)). See ``fit_model`` for what is written.
    """
    if train.get("distribute") == "multi_worker":
        from models.multiworker import in_worker, train_in_workers

        if not in_worker():
            if on_epoch is not None:
                logger.info("multi-worker training: epochs are logged by the workers, not as progress artifacts")
            return train_in_workers("models.training:train_classifier", {
                "loader": loader, "train_keys": train_keys, "train_labels": train_labels, "val_keys": val_keys,
                "val_labels": val_labels, "input_shape": input_shape, "arch": arch, "params": params, "train": train,
                "augment": augment, "n_classes": n_classes}, workers=int(train.get("workers", 2)), run_dir=run_dir)
    keras = _keras()
    from models import get

    def build():
        model = get(arch)(tuple(input_shape), n_classes=n_classes, **params)
        loss = keras.losses.BinaryCrossentropy() if n_classes == 2 else keras.losses.CategoricalCrossentropy()
        model.compile(optimizer=make_optimizer(train), loss=loss,
                      metrics=[keras.metrics.AUC(name="auc"), keras.metrics.CategoricalAccuracy(name="accuracy")
                               if n_classes > 2 else keras.metrics.BinaryAccuracy(name="accuracy")])
        return model

    def datasets(initial_epoch: int):
        common = {"batch_size": int(train["batch_size"]), "input_shape": tuple(input_shape), "n_classes": n_classes}
        train_ds = make_dataset(loader, train_keys, train_labels, augment=augment or None, shuffle=True,
                                seed=int(train["seed"]), epoch=initial_epoch, **common)
        val_ds = make_dataset(loader, val_keys, val_labels, **common)
        return train_ds, val_ds

    return fit_model(build=build, datasets=datasets, train=train, run_dir=run_dir, on_epoch=on_epoch,
                     class_weight=class_weights(np.asarray(train_labels), train["class_weight"]),
                     describe=f"{arch}: {len(train_keys)} train / {len(val_keys)} val arrays of shape "
                              f"{tuple(input_shape)}, {n_classes} classes")


def make_optimizer(train: dict):
    keras = _keras()
    optimizers = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}
    return optimizers[train["optimizer"]](learning_rate=float(train["learning_rate"]))


def fit_model(
    *,
    build: Callable[[], object],
    datasets: Callable[[int], tuple[object, object]],
    train: dict,
    run_dir: str | Path,
    describe: str,
    on_epoch: Callable[[int, int, dict], None] | None = None,
    class_weight: dict | None = None,
) -> dict:
    """Train a compiled model from ``build()`` on ``datasets(initial_epoch)``; resume an interrupted run.

    Writes ``checkpoints/last.keras`` and ``state.json`` every epoch, ``checkpoints/best.keras``
    on improvement of validation loss, ``history.csv``, and the final ``model.keras`` (best weights).

    Returns:
        ``{"model", "history", "epochs_run", "epochs_trained", "resumed_from_epoch", "best_epoch",
        "device", "seconds", "params"}``.
    """
    keras = _keras()
    import models.losses  # noqa: F401  (registers the segmentation loss for checkpoints)
    from medflow.hardware import describe as hardware_facts

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    done = run_dir / "training.json"
    if done.exists() and (run_dir / "model.keras").exists():
        logger.info("training already complete in %s; reusing model.keras", run_dir)
        return {**json.loads(done.read_text()), "epochs_trained": 0}
    strategy = distribution_strategy(train)  # first: a multi-worker strategy must precede every other TF call
    keras.utils.set_random_seed(int(train["seed"]))
    if train.get("deterministic"):
        deterministic_ops()
    device = accelerator()
    policy = precision_policy(train.get("mixed_precision"), gpu="GPU" in device)
    keras.mixed_precision.set_global_policy(policy)
    def scope():  # a strategy's scope is entered anew each time
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    if strategy is not None:
        device += f", {train['distribute']} over {strategy.num_replicas_in_sync} replica(s)"
    if policy != "float32":
        device += f", {policy}"

    initial_epoch, model = 0, None
    if state_path.exists() and (ckpt / "last.keras").exists():
        try:
            initial_epoch = int(json.loads(state_path.read_text())["epoch"])
            with scope():  # a checkpoint of a distributed run resumes on one device and the other way round
                model = keras.models.load_model(ckpt / "last.keras")
            logger.info("resuming from epoch %d (%s)", initial_epoch, ckpt / "last.keras")
        except Exception as exc:  # noqa: BLE001 (any damage to the files: start over rather than fail for ever)
            logger.warning("cannot resume from %s (%s: %s); training afresh", ckpt / "last.keras",
                           type(exc).__name__, str(exc)[:200])
            initial_epoch, model = 0, None
            for stale in (state_path, run_dir / "history.csv", *ckpt.glob("*.keras")):
                stale.unlink(missing_ok=True)
    if model is None:
        with scope(), keras_seed_draws(int(train["seed"])):
            model = build()
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        synchronize_batch_norm(model)
    if train.get("distribute") == "multi_worker":
        # Keras 3.15 reduces the first (x, y) batch across replicas to build the model symbolically, and
        # the multi-worker strategy cannot reduce a tuple ("Attempt to convert a value (PerReplica...)").
        # The model is built already; without a recorded strategy Keras skips that step and trains
        # under the strategy of the scope `fit` runs in.
        model._distribute_strategy = None
    if train.get("jit_compile"):
        model.jit_compile = True  # XLA: fuses the step's ops (a GPU gains most; measured in the README)
    logger.info("training %s on %s", describe, device)
    train_ds, val_ds = datasets(initial_epoch)
    keras_shuffles = not getattr(train_ds, "orders_itself", False)
    epoch_hooks = [_epoch_setter(keras, train_ds)] if hasattr(train_ds, "set_epoch") else []
    if strategy is not None:
        batch = int(train["batch_size"])
        train_ds, val_ds = as_global_batches(train_ds, batch), as_global_batches(val_ds, batch)

    epochs = int(train["epochs"])
    started = {"t": time.perf_counter()}

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.first = None

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            extra = "  ".join(f"{k} {v:.3f}" for k, v in logs.items() if k.startswith("val_") and k != "val_loss")
            elapsed = time.perf_counter() - started["t"]
            self.first = epoch if self.first is None else self.first  # a resumed run starts past epoch 0
            per_epoch = elapsed / (epoch + 1 - self.first)
            left = per_epoch * (epochs - epoch - 1)
            logger.info("epoch %d/%d  loss %.4f  val_loss %.4f  %s  (%.1f s/epoch, %.0f s so far; at most %s left%s)",
                        epoch + 1, epochs, logs.get("loss", float("nan")), logs.get("val_loss", float("nan")), extra,
                        per_epoch, elapsed, _duration(left),
                        ", early stopping may end sooner" if early is not None and left > 0 else "")
            if on_epoch:
                on_epoch(epoch + 1, epochs, logs)

    early = plateau = smoother = None
    smoothing = float(train.get("val_smoothing") or 0.0)
    monitor = SMOOTH_KEY if smoothing > 0 else "val_loss"
    if smoothing > 0:
        smoother = _smoother(keras, smoothing)
    if train.get("early_stopping"):
        early = keras.callbacks.EarlyStopping(monitor=monitor, patience=int(train["early_stopping"]),
                                              restore_best_weights=True, mode="min",
                                              start_from_epoch=int(train.get("min_epochs") or 0))
    if train.get("reduce_lr"):
        plateau = keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="min", factor=0.5,
                                                    patience=int(train["reduce_lr"]), min_lr=1e-5)
    best_checkpoint = _atomic_checkpoint(keras, ckpt / "best.keras", best_only=True, monitor=monitor)
    callbacks = [
        *epoch_hooks,
        *([smoother] if smoother is not None else []),
        best_checkpoint,
        *_tensorboard(keras, run_dir),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        Progress(),
        *(cb for cb in (early, plateau) if cb is not None),
        _atomic_checkpoint(keras, ckpt / "last.keras", best_only=False),
        _resume_callback(keras, state_path, early, plateau, smoother, best_checkpoint),  # after last.keras: state.json commits the epoch
    ]
    with scope():
        hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                         callbacks=callbacks, class_weight=class_weight,
                         shuffle=keras_shuffles)
    history = read_history(run_dir / "history.csv")
    model_path = save_model_atomic(model, run_dir / "model.keras")
    val_loss = history.get(monitor, history.get("val_loss", []))
    result = {
        "model": str(model_path),
        "history": history,
        "epochs_run": len(val_loss),
        "epochs_trained": len(hist.history.get("loss", [])),
        "resumed_from_epoch": initial_epoch,
        "best_epoch": int(np.argmin(val_loss)) + 1 if val_loss else None,
        "selected_by": monitor if val_loss else None,
        "device": device,
        "hardware": hardware_facts(),
        "seconds": time.perf_counter() - started["t"],
        "params": int(model.count_params()),
    }
    if train.get("distribute") == "multi_worker":
        from models.multiworker import weights_digest

        result["weights_digest"] = weights_digest(model)
    write_text_atomic(run_dir / "training.json", json.dumps(result, indent=1))
    return result


def _duration(seconds: float) -> str:
    """``95`` -> ``'1 min 35 s'``.

    >>> _duration(95), _duration(7), _duration(3700)
    ('1 min 35 s', '7 s', '1 h 1 min')
    """
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def save_model_atomic(model, path: Path) -> Path:
    """``model.save`` to a temporary ``.keras`` file beside ``path``, then a rename: never a partial file."""
    import uuid

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.keras")  # Keras wants the suffix; see
    # medflow.runs.remove_partial_files for who cleans up after a kill
    model.save(tmp)
    os.replace(tmp, path)
    return path


_KERAS_DRAWS = threading.Lock()


@contextlib.contextmanager
def keras_seed_draws(seed: int):
    """Keras' default seeds (every initializer and dropout layer built without one) drawn from a generator
    of ``seed``'s own while the block runs, instead of Python's global ``random``.

    Keras 3 draws them with ``random.randint``; ``keras.utils.set_random_seed`` seeds that, but any
    other thread of the process (Prefect's run-name generator, a log worker, a second fold) may draw
    between the seeding and the build, and the model's initial weights change. The draws go to a
    private ``random.Random(seed)``; one build at a time holds it.
    """
    import random

    from keras.src.random import seed_generator

    with _KERAS_DRAWS:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


def precision_policy(mixed: bool | str | None, *, gpu: bool, bf16_cpu: bool | None = None) -> str:
    """The Keras dtype policy of ``train.mixed_precision``.

    ``float16`` on a GPU; ``bfloat16`` on a CPU with bfloat16 instructions (AVX512_BF16 or AMX);
    ``true`` picks whichever the device has, and stays float32 (with a log line) where it has neither.

    >>> precision_policy(False, gpu=True), precision_policy(True, gpu=True), precision_policy(True, gpu=False, bf16_cpu=True)
    ('float32', 'mixed_float16', 'mixed_bfloat16')
    >>> precision_policy(True, gpu=False, bf16_cpu=False)
    'float32'
    """
    if not mixed:
        return "float32"
    if bf16_cpu is None:
        from medflow.hardware import has_bf16

        bf16_cpu = has_bf16()
    if mixed == "float16" or (mixed is True and gpu):
        if not gpu:
            raise ValueError("Received train.mixed_precision='float16' on a machine without a GPU; float16 "
                             "compute is for GPUs (use 'bfloat16' or true).")
        return "mixed_float16"
    if bf16_cpu or gpu:
        return "mixed_bfloat16"
    logger.info("train.mixed_precision: this CPU has no bfloat16 instructions; training in float32")
    return "float32"


def deterministic_ops() -> None:
    """Make the backend's ops deterministic (same inputs, same bits), for ``train.deterministic``."""
    keras = _keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)
    # JAX on CPU is deterministic already
    logger.info("deterministic ops on (%s)", backend)


def dense_activity(model_path: str | Path, loader: Callable[[str], np.ndarray], keys: list[str], *,
                   batch_size: int = 8) -> dict[str, dict]:
    """For each hidden ``Dense`` layer with a ReLU of the saved model: how many of its units never gave a
    positive output on ``keys`` (dead units), e.g. ``{"dense": {"units": 512, "never_active": 332}}``."""
    keras = _keras()
    model = keras.models.load_model(model_path, compile=False)
    relu = keras.activations.get("relu")
    hidden = [layer for layer in model.layers[:-1]
              if isinstance(layer, keras.layers.Dense) and getattr(layer, "activation", None) is relu]
    if not hidden or not keys:
        return {}
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # one tensor in, as the batches come
    probe = keras.Model(inputs, [layer.output for layer in hidden])
    ds = make_dataset(loader, keys, None, batch_size=batch_size, input_shape=tuple(model.input_shape[1:]))
    active = [np.zeros(int(layer.units), bool) for layer in hidden]
    for i in range(len(ds)):
        batch = ds[i]
        outs = probe(batch[0] if isinstance(batch, tuple) else batch, training=False)
        for j, out in enumerate(outs if isinstance(outs, (list, tuple)) else [outs]):
            active[j] |= np.asarray(out).reshape(-1, active[j].size).max(axis=0) > 0
    return {layer.name: {"units": int(a.size), "never_active": int((~a).sum())} for layer, a in zip(hidden, active)}


def predict(model_path: str | Path, loader: Callable[[str], np.ndarray], keys: list[str], *, batch_size: int = 8
            ) -> np.ndarray:
    """Scores of the saved classifier for ``keys``: (N,) positive-class scores for a sigmoid output,
    (N, K) class probabilities for a softmax one.

    A k-fold run's ``model.keras`` is the ensemble (``models.ensemble``): a series that a fold
    held out is scored by that fold's model alone (out of fold), every other one by the ensemble.
    """
    from models.ensemble import manifest_of

    keras = _keras()

    def scores(path, subset):
        model = keras.models.load_model(path, compile=False)
        ds = make_dataset(loader, subset, None, batch_size=batch_size, input_shape=tuple(model.input_shape[1:]))
        return np.asarray(model.predict(ds, verbose=0), dtype=float)

    manifest = manifest_of(model_path)
    if manifest is None:
        out = scores(model_path, keys)
    else:
        held = {key: fold for fold, members in enumerate(manifest["held_out"]) for key in members}
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(held.get(key, -1), []).append(i)
        out = None
        for fold, rows in sorted(groups.items()):
            path = model_path if fold < 0 else Path(model_path).parent / manifest["models"][fold]
            part = scores(path, [keys[i] for i in rows])
            if out is None:
                out = np.zeros((len(keys), *part.shape[1:]))
            out[rows] = part
    return out.reshape(-1) if out.shape[-1] == 1 else out
