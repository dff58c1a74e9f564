"""Prefect task of the report stage: the HTML report, provenance, and Prefect artifacts."""

from __future__ import annotations

import hashlib
import json
import time
from importlib import metadata
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from medflow import kinds
from medflow.kinds.base import split_counts
from medflow.report_server import report_link
from medflow.reporting import build_context, markdown_summary, qc_summary, quarantine_summary, render_html
from medflow.runs import read_metrics, write_text_atomic
from storage.store import Store
from medflow.tables import read_csv

PACKAGES = ("medflow", "prefect", "keras", "tensorflow-cpu", "tensorflow", "dask", "distributed", "zarr",
            "pydicom", "scikit-image", "scikit-learn", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def data_digest(catalog: dict[str, dict], keys) -> str:
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(f"{key}:{catalog[key]['digest']}\n".encode())
    return h.hexdigest()


def _artifact_key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


@task(name="render_report")
def render_report_task(spec, run_dir: str, prep_key: str, stage_seconds: dict[str, float],
                       flow_run_id: str | None) -> str:
    """Write ``report.html``, ``provenance.json`` and ``summary.json`` (what the artifacts show)."""
    log = get_run_logger()
    run_dir = Path(run_dir)
    store = Store(spec.data.store)
    catalog = store.catalog()
    preds = read_csv(run_dir / "predictions.csv", dtype={"label_name": str, "prediction_name": str})
    evaluation = read_metrics(run_dir / "metrics.json")
    training = json.loads((run_dir / "training.json").read_text())
    quarantine = store.quarantine()
    provenance = {
        "run_id": run_dir.name,
        "spec_digest": spec.digest(),
        "data_digest": data_digest(catalog, preds["series_key"]),
        "prep_key": prep_key,
        "flow_run_id": flow_run_id,
        "stage_seconds": stage_seconds,
        "packages": package_versions(),
        "training": {k: training.get(k) for k in ("epochs_run", "best_epoch", "selected_by", "device", "seconds",
                                                  "params")},
        # the machine that trained: a model's numbers hold for one CPU kind and device at most
        "hardware": training.get("hardware"),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    write_text_atomic(run_dir / "provenance.json", json.dumps(provenance, indent=1))
    kind = kinds.get(spec.model.task)
    counts = split_counts(preds, kind.class_names(evaluation))
    context = build_context(
        kind=kind, section=kind.report_context(spec, run_dir, preds, evaluation), name=spec.name,
        run_id=run_dir.name, cohort={"series": len(catalog), "labelled": len(preds),
                                     "patients": int(preds["patient_key"].nunique()),
                                     "split": _split_note(run_dir)},
        split_counts=counts, quarantine=quarantine, history=training["history"], provenance=provenance,
        qc=qc_summary(catalog, quarantine),
    )
    report = run_dir / "report.html"
    write_text_atomic(report, render_html(context))
    summary = {
        "name": spec.name,
        "markdown": markdown_summary(context, kind.markdown(context)),
        "metrics": context["metrics"],
        "cohort": counts,
        "quarantine": quarantine_summary(quarantine) or [{"reason": "none", "files": 0}],
        "qc": context["qc"],
        "tables": context.get("tables", {}),  # the kind's own tables, e.g. per-class metrics
        "report": str(report.resolve()),
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    log.info("report: %s", report)
    return str(report)


def publish_artifacts(run_dir: str) -> list[str]:
    """Publish the run's summary as Prefect artifacts on the flow run that calls this (a plain function, not a
    task: artifacts made in a task hung off the task run, and the UI's Artifacts tab showed "Flow run: None")."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    key = _artifact_key(summary["name"])
    create_markdown_artifact(summary["markdown"], key=f"{key}-report", description="run summary")
    create_table_artifact(summary["metrics"], key=f"{key}-metrics", description="test metrics with 95% CI")
    create_table_artifact(summary["cohort"], key=f"{key}-cohort", description="series, patients and classes per split")
    create_table_artifact(summary["quarantine"], key=f"{key}-quarantine", description="quarantined files by reason")
    create_table_artifact(summary["qc"], key=f"{key}-qc", description="geometry QC: series quarantined and corrected")
    for name, table in summary.get("tables", {}).items():
        create_table_artifact(table["rows"], key=f"{key}-{_artifact_key(name)}", description=table["description"])
    link, description = report_link(summary["report"])
    create_link_artifact(link, link_text="report.html", key=f"{key}-report-file", description=description)
    return [f"{key}-{suffix}" for suffix in ("report", "metrics", "cohort", "quarantine", "qc", "report-file")]


def _split_note(run_dir: Path) -> str | None:
    """Where the run's split came from (``split.json`` of the split stage), for the report."""
    path = Path(run_dir) / "split.json"
    return json.loads(path.read_text()).get("note") if path.exists() else None

