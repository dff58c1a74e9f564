"""Signal classification: a class per waveform (an ECG), with recurrent or 1D-convolutional models.

Waveforms come from DICOM waveform objects (``storage.waveform``), stored as (1, samples,
leads) in millivolts with their sampling rate and lead names, prepared by the signal steps
of ``medflow.signals`` and fed to a model as (samples, leads, 1). Everything else (split,
training, multi-class metrics, bootstrap intervals, predict) is classification's. What is
particular: the spec's checks, the declared baseline (a logistic regression on the mean
heart rate, the one number a rhythm is first judged by) and the explanation (integrated
gradients over time, drawn as a heat strip under the trace).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medflow.kinds.classification import Classification
from medflow.runs import save_npz_atomic

logger = logging.getLogger(__name__)

# image steps that make no sense on a waveform (they move pixels of an image)
IMAGE_ONLY_STEPS = ("resample", "lung_mask", "window", "resize", "crop_pad", "resize2d", "equalize", "axial_slice")
BASELINE_LEAD = "II"


def _baseline_lead(store, prep_key: str, key: str) -> tuple[np.ndarray, float]:
    """Lead II of a prepared record (the first kept lead where II was not kept) and its sampling rate in Hz:
    what the baselines read."""
    from medflow.signals import rate_of

    trace = store.read_prep(prep_key, key)[0]
    entry = store.catalog_entry(key)
    attrs = store.prep_attrs(prep_key, key) or {}
    kept = _leads_after(attrs.get("steps", []), entry.get("leads") or [])
    lead = kept.index(BASELINE_LEAD) if BASELINE_LEAD in kept else 0
    return trace[:, lead], rate_of(attrs.get("spacing", entry["spacing"]))


class Signal(Classification):
    name = "signal"
    template = "signal.html.j2"
    strong_baselines = ("ecg_features",)
    takes_images = False

    def check_spec(self, spec) -> list[str]:
        problems = super().check_spec(spec)
        used = [name for name, _ in spec.steps() if name in IMAGE_ONLY_STEPS]
        if used:
            problems.append(f"preprocess: {', '.join(used)} are image steps; a waveform takes resample_signal, "
                            "bandpass, notch, baseline, normalize_leads, crop_pad_signal, select_leads (and zscore, "
                            "clip, rescale)")
        aug = spec.augment
        if aug.flip or aug.shift or aug.rotate_deg or aug.zoom:
            problems.append("augment: flip, shift, rotate_deg and zoom move pixels of an image; a waveform takes "
                            "intensity_jitter and contrast only")
        if "crop_pad_signal" not in [name for name, _ in spec.steps()]:
            problems.append("preprocess: end with crop_pad_signal so that every waveform has the same length")
        return problems

    # ---------------------------------------------------------- baseline
    @property
    def baseline_name(self) -> str:
        return f"logistic regression on the mean heart rate (R peaks of lead {BASELINE_LEAD})"

    def baseline_feature(self, store, prep_key: str, key: str) -> float:
        from medflow.signals import heart_rate

        return heart_rate(*_baseline_lead(store, prep_key, key))

    def strong_feature(self, name: str, store, prep_key: str, key: str) -> np.ndarray:
        """``ecg_features`` of lead II (``medflow.strong_baselines``)."""
        from medflow.strong_baselines import ecg_features

        return ecg_features(*_baseline_lead(store, prep_key, key))

    # ------------------------------------------------------- explanation
    def explain(self, model_path: str, loader, df: pd.DataFrame, run_dir: Path) -> dict | None:
        """Integrated gradients over time for a few test cases (errors first) into ``explain.npz``,
        computed in a child process (``models.explain.explain_isolated``); returns its record."""
        from models.explain import explain_isolated, select_cases

        rows = df[df["split"] == "test"][["series_key", "label", "label_name", "prediction", "prediction_name",
                                          "confidence"]].to_dict("records")
        cases = select_cases(rows)
        if not cases:
            return None
        traces = [np.asarray(loader(case["series_key"]), np.float32)[0] for case in cases]  # (samples, leads)
        heats, record = explain_isolated("integrated_gradients_job", model_path, traces,
                                         [c["prediction"] for c in cases], method="integrated gradients")
        meta = [{k: (c[k].item() if hasattr(c[k], "item") else c[k]) for k in
                 ("series_key", "label_name", "prediction_name", "confidence")} for c in cases]
        if heats is not None:
            save_npz_atomic(Path(run_dir) / "explain.npz", traces=np.stack(traces), heats=np.stack(heats),
                            meta=np.array(json.dumps(meta)))
            logger.info("integrated gradients for %d test case(s)", len(cases))
        return {**record, "cases": meta}

    def report_context(self, spec, run_dir, predictions, evaluation) -> dict:
        from medflow.reporting import plot_signal_explanations

        context = super().report_context(spec, run_dir, predictions, evaluation)
        path = Path(run_dir) / "explain.npz"
        context["plots"]["traces"] = None
        if path.exists():
            with np.load(path) as data:
                if "traces" in data:
                    rates = [kw["rate"] for name, kw in spec.steps() if name == "resample_signal"]
                    context["plots"]["traces"] = plot_signal_explanations(
                        data["traces"], data["heats"], json.loads(str(data["meta"])), rate=rates[-1] if rates else None)
        return context


def _leads_after(steps, leads: list[str]) -> list[str]:
    """The lead names left after the steps (``select_leads`` keeps and orders them)."""
    for name, kwargs in steps:
        if name == "select_leads":
            leads = list(kwargs["leads"])
    return list(leads)
