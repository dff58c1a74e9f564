"""Inference on new DICOM studies with a trained run; what is written is the run's task kind's choice.

New studies are read straight from their folder, never from the training store: they are
ingested into a temporary scratch store with the run's own ingest settings (so HU
conversion, slice sorting and QC are those the model was trained with), prepared with the
run's exact preprocessing steps, and predicted. A segmentation is mapped back through the
preprocessing onto the original slices and written as a DICOM SEG (highdicom) per series,
referencing the source instances and naming the algorithm (AlgorithmIdentificationSequence
with the run id). A classifier writes ``predictions.csv`` and ``predictions.json`` with the
score and the decision at the run's validation threshold.

The outputs go back to the PACS, so they carry the studies' UIDs (a SEG must); logs and
the scratch store do not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import yaml

from medflow.runs import read_metrics
from medflow.spec import PipelineSpec, parse_spec
from medflow.tables import write_csv_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedRun:
    """What inference needs from a run folder."""

    run_dir: Path
    spec: PipelineSpec
    model_path: Path
    metrics: dict  # metrics.json: the decision threshold, the classes, ...

    @property
    def run_id(self) -> str:
        return self.run_dir.name


def load_run(run_dir: str | Path) -> TrainedRun:
    """A finished run's resolved spec, model and decision threshold.

    Raises:
        FileNotFoundError: the folder is not a finished medflow run.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    spec_file, model = run_dir / "spec.yaml", run_dir / "model.keras"
    missing = [p.name for p in (spec_file, model) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished medflow run (missing {', '.join(missing)}); pass the "
                                "run folder that `medflow run` printed")
    spec = parse_spec(yaml.safe_load(spec_file.read_text()), base_dir=run_dir, check_paths=False)
    metrics = run_dir / "metrics.json"
    return TrainedRun(run_dir, spec, model, read_metrics(metrics) if metrics.exists() else {})


def input_folder(value: str | Path) -> Path:
    """A folder of DICOM files or (for a run on PNG/JPEG images) of images, or the ``data.source`` of a spec."""
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from medflow.spec import load_spec

        return Path(load_spec(path).data.source)
    raise FileNotFoundError(f"input {str(value)!r} is neither a DICOM folder nor a spec file")


def source_slices(source: Path, files: list[str], direction) -> list[pydicom.Dataset]:
    """The series' source instances in the stored volume's order (ascending along the slice normal)."""
    datasets = [pydicom.dcmread(source / f) for f in files]
    normal = np.asarray(direction[0], dtype=float)
    along = [float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal)) for ds in datasets]
    return [datasets[i] for i in np.argsort(along, kind="stable")]


def seg_supported(entry: dict) -> str | None:
    """Why a stored series cannot get a DICOM SEG on its source slices, or None when it can."""
    if entry.get("parent"):
        return "the series was split at ingest"
    if entry.get("qc", {}).get("actions"):
        return "its geometry was corrected at ingest (" + "; ".join(entry["qc"]["actions"]) + ")"
    if entry.get("n_frames") != entry.get("n_files"):
        return "multi-frame source images"
    return None


def write_seg(sources: list[pydicom.Dataset], mask: np.ndarray, out: Path, *, run: TrainedRun,
              segment_label: str) -> Path:
    """A DICOM SEG of a binary ``mask`` (one frame per source slice, same order) made by ``run``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medflow import __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medflow {run.spec.name}", family=codes.DCM.ArtificialIntelligence, version=__version__,
        source="medflow", parameters={"run_id": run.run_id, "arch": run.spec.model.arch},
    )
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(bool), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medflow",
        manufacturer_model_name=run.spec.model.arch, software_versions=__version__,
        device_serial_number=run.run_id, series_description=f"medflow {run.spec.name}"[:64],
    )
    seg.save_as(out)
    return out


def predict_store(run: TrainedRun, scratch_root: str, source: Path, output: Path, *,
                  image_files: dict[str, str] | None = None) -> list[dict]:
    """Predict every series of a scratch store with the run's task kind; one row per series, with the
    study and series UIDs the outputs go back to the PACS with, or (``image_files``: image key -> file, for
    PNG/JPEG inputs) the image's file relative to the input folder."""
    from medflow import kinds
    from storage.store import Store

    from storage.ingest import source_index

    store = Store(scratch_root)
    files_of: dict[str, list[str]] = {}
    catalog = store.catalog()
    for relpath, rec in source_index(store, str(source)).items():
        if "series_key" in rec and "reason" not in rec and "mask_for" not in rec:
            files_of.setdefault(rec["series_key"], []).append(relpath)
            for prefix in "iw":  # a planar image or a waveform is stored under its instance's key
                if prefix + rec.get("sop_key", "")[:15] in catalog:
                    files_of.setdefault(prefix + rec["sop_key"][:15], []).append(relpath)
    output.mkdir(parents=True, exist_ok=True)
    if image_files is not None:
        files_of = {key: [rel] for key, rel in image_files.items()}
    rows = kinds.get(run.spec.model.task).predict(run, store, source, output, files_of)
    if image_files is not None:
        return [{"file": image_files.get(row["series_key"], ""), **row} for row in rows]
    for row in rows:
        entry = catalog[row["series_key"]]
        files = files_of.get(entry.get("parent", row["series_key"]), [])
        first = pydicom.dcmread(source / files[0], stop_before_pixels=True) if files else None
        row["StudyInstanceUID"] = str(first.StudyInstanceUID) if first else ""
        row["SeriesInstanceUID"] = str(first.SeriesInstanceUID) if first else ""
    return rows


def prep_key_for(store, steps, key: str) -> str:
    """Prepare one series in the scratch store with the run's steps; returns the prep key."""
    from medflow.preprocessing import preprocess_series, steps_key

    prep_key = steps_key(steps)
    if store.prep_attrs(prep_key, key) is None:
        preprocess_series(store.url, key, steps, prep_key)
    return prep_key


def write_outputs(rows: list[dict], output: Path, run: TrainedRun, quarantine: list[dict]) -> dict:
    """``predictions.csv`` and ``predictions.json`` (with the run id and the files not used)."""
    import pandas as pd

    from medflow.runs import write_text_atomic

    from medflow import kinds

    # with no row, still the header: a reader finds the columns and predictions.json says why
    columns = ["StudyInstanceUID", "SeriesInstanceUID"] if run.spec.data.format == "dicom" else ["file"]
    columns += [c for c in kinds.get(run.spec.model.task).predict_table_columns() if c != "note"]
    write_csv_atomic(output / "predictions.csv", pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns))
    summary = {"run_id": run.run_id, "pipeline": run.spec.name, "task": run.spec.model.task,
               "arch": run.spec.model.arch, "model_warnings": run.metrics.get("warnings", []), "series": rows,
               "not_used": [{"path": r["path"], "reason": r["reason"]} for r in quarantine]}
    write_text_atomic(output / "predictions.json", json.dumps(summary, indent=1, default=str))
    return summary
