"""The k-fold ensemble: one Keras model that averages the fold models, and out-of-fold scoring.

With ``data.split.folds: K`` each fold's model is trained in ``folds/<k>/`` of the run
folder. ``build_ensemble`` saves ``model.keras``: a functional model whose output is the
mean of the fold models' outputs (mean probability), so everything that loads a run's
model (evaluate, ``medflow predict``, a served deployment) uses the ensemble unchanged.
``folds.json`` beside it records which series each fold held out: ``models.training.predict``
scores a held-out series with its own fold's model only (an out-of-fold score, what the
validation-side choices such as the threshold are made on), and every other series with
the ensemble.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "folds.json"


def manifest_of(model_path: str | Path) -> dict | None:
    """The fold manifest beside a run's ``model.keras``, or None for a single-model run."""
    path = Path(model_path).with_name(MANIFEST)
    return json.loads(path.read_text()) if path.exists() else None


def build_ensemble(member_paths: list[str | Path], out_path: str | Path) -> Path:
    """Save the mean of the member models' outputs as one Keras model at ``out_path`` (atomically)."""
    import keras

    from models.training import save_model_atomic

    members = [keras.models.load_model(p, compile=False) for p in member_paths]
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    outputs = []
    for i, member in enumerate(members):
        member.name = f"fold_{i}"  # unique names inside the ensemble
        outputs.append(member(inputs))
    mean = keras.layers.Average(name="fold_mean")(outputs) if len(outputs) > 1 else outputs[0]
    ensemble = keras.Model(inputs, mean, name=f"ensemble_of_{len(members)}")
    return save_model_atomic(ensemble, Path(out_path))


def member_for_explanations(model_path: str | Path) -> Path:
    """A single model to explain (Grad-CAM needs one network's layers): fold 0's, else the model itself."""
    manifest = manifest_of(model_path)
    return Path(model_path).parent / manifest["models"][0] if manifest else Path(model_path)
