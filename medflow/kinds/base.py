"""The interface every task kind implements (no Prefect here: kinds are plain Python).

Each method is one stage's question. The stages (Prefect tasks in ``tasks/``) pass in the
spec, the store and the run folder, and write nothing kind-specific themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

OnEpoch = Callable[[int, int, dict], None]


class TaskKind:
    """What one kind of problem needs from each stage of the lifecycle."""

    #: the value of ``model.task`` that selects this kind
    name: ClassVar[str] = ""
    #: every metric ``evaluate.metrics`` may name for this kind, in report order (the default is all)
    metrics: ClassVar[tuple[str, ...]] = ()
    #: the report section (a Jinja template in ``medflow/templates``)
    template: ClassVar[str] = ""
    #: whether ``train`` can launch ``train.distribute: multi_worker`` workers (its training arguments pickle)
    multi_worker: ClassVar[bool] = False
    #: whether the kind prepares images or volumes (then the waveform steps do not apply)
    takes_images: ClassVar[bool] = True
    #: the strong classical baselines (``evaluate.baselines``, ``medflow.strong_baselines``) the kind can score
    strong_baselines: ClassVar[tuple[str, ...]] = ()

    # ---------------------------------------------------------------- spec
    def check_spec(self, spec) -> list[str]:
        """Problems with a spec for this kind, one line each: ``field.path: what is wrong``."""
        problems = []
        wrong = [m for m in spec.evaluate.metrics or [] if m not in self.metrics]
        if wrong:
            problems.append(f"evaluate.metrics: {wrong} do not apply to {self.name}; expected some of: "
                            f"{', '.join(self.metrics)} (received: {spec.evaluate.metrics})")
        from medflow.spec import SIGNAL_STEP_NAMES

        if self.takes_images:
            used = [name for name, _ in spec.steps() if name in SIGNAL_STEP_NAMES]
            if used:
                problems.append(f"preprocess: {', '.join(used)} are waveform steps; {self.name} prepares images "
                                f"(received: {', '.join(name for name, _ in spec.steps())})")
        unknown = [b for b in spec.evaluate.baselines if b not in self.strong_baselines]
        if unknown:
            problems.append(f"evaluate.baselines: {unknown} do not apply to {self.name}; it scores "
                            + (", ".join(self.strong_baselines) or "its own declared baseline only")
                            + f" (received: {spec.evaluate.baselines})")
        if spec.train.distribute == "multi_worker" and not self.multi_worker:
            problems.append(f"train.distribute: multi_worker is not available for {self.name} yet; use mirrored "
                            "(several devices of one machine) or none (received: multi_worker)")
        return problems

    def preflight(self, spec) -> list[str]:
        """Problems that stop a whole run but not an ingest (``medflow validate`` and ``medflow run`` report them;
        ``medflow ingest`` and the ingest deployment do not need a spec that can train)."""
        return []

    # -------------------------------------------------------------- cohort
    def cohort(self, spec, store) -> pd.DataFrame:
        """The cases of the run: one row per series with ``series_key, patient_key, study_key, label``
        (``label`` an integer class index used to stratify the split) and ``label_name``."""
        raise NotImplementedError

    def class_names(self, evaluation: dict) -> list[str]:
        """The names of the label indices of a run (from its ``metrics.json``), for cohort tables."""
        raise NotImplementedError

    # --------------------------------------------------------------- train
    def train(self, spec, store, prep_key: str, cases: pd.DataFrame, run_dir: Path, on_epoch: OnEpoch | None
              ) -> dict:
        """Train on the ``train`` rows of ``cases``, select on the ``val`` rows; returns ``fit_model``'s result."""
        raise NotImplementedError

    # ------------------------------------------------------------ evaluate
    def evaluate(self, spec, store, prep_key: str, cases: pd.DataFrame, model_path: str, run_dir: Path) -> dict:
        """Predict, choose what is chosen on validation, score the test split; write ``predictions.csv``
        and ``metrics.json`` into ``run_dir``; return the metrics (``test`` holds the test summary)."""
        raise NotImplementedError

    def result_line(self, evaluation: dict) -> str:
        """One line for the terminal: the test result."""
        raise NotImplementedError

    # -------------------------------------------------------------- report
    def report_context(self, spec, run_dir: Path, predictions: pd.DataFrame, evaluation: dict) -> dict:
        """What the kind's report section shows. ``metrics`` rows are also the Prefect metrics table;
        ``tables`` (optional, ``{name: {"rows", "description"}}``) become Prefect table artifacts too."""
        raise NotImplementedError

    def markdown(self, context: dict) -> list[str]:
        """Lines under the metrics table in the Prefect markdown artifact."""
        return []

    # ------------------------------------------------------------- predict
    def predict(self, run, store, source: Path, output: Path, files_of: dict[str, list[str]]) -> list[dict]:
        """Predict every series of a scratch store of new studies; write the kind's outputs into ``output``.

        Returns one row per series (``predictions.csv``); the caller adds the study and series UIDs.
        """
        raise NotImplementedError

    def predict_table_columns(self) -> tuple[str, ...]:
        """Columns of the predict results shown as a Prefect table."""
        return ("series_key", "note")

    def __repr__(self) -> str:
        return f"<task kind {self.name}>"


def split_counts(cases: pd.DataFrame, class_names: list[str]) -> list[dict[str, Any]]:
    """Series, patients and series per class in each split (the report's cohort table)."""
    rows = []
    for name in ("train", "val", "test"):
        part = cases[cases["split"] == name]
        row = {"split": name, "series": len(part), "patients": int(part["patient_key"].nunique())}
        for index, cls in enumerate(class_names):
            row[cls] = int((part["label"] == index).sum())
        rows.append(row)
    return rows
