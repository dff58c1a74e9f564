"""The whole lifecycle as one flow of subflows: ingest → preprocess → train → evaluate → report.

Stage subflows run in the pipeline's own process, so they skip their own heartbeat: the
pipeline flow's heartbeat already reports that the process is alive, and a sync subflow
with a heartbeat waits up to 1 s at exit for its heartbeat thread (measured with Prefect
3.8.8: 1.2 s per stage with it, 0.2-0.6 s without). A stage deployed on its own
(`ingest/hourly`) keeps its heartbeat. The flows stay synchronous: async subflows skip the
join too, but with the embedded SQLite server their parent task-run insert usually collides
with the server recording the previous subflow (HTTP 503, then a ~2 s client retry).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_client
from prefect import tags as prefect_tags
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.preprocess import preprocess_flow
from flows.report import report_flow
from flows.train import train_flow
from medflow.report_server import report_link
from medflow.runs import note_progress, open_run, write_status, write_text_atomic
from tasks.report import publish_artifacts
from medflow.spec import load_spec
from storage.store import Store


@flow(name="pipeline")
def pipeline(spec: str, overrides: dict[str, Any] | None = None, tags: list[str] | None = None) -> dict:
    """Run the whole lifecycle for the spec file at ``spec``.

    ``overrides``: dotted spec fields to change for this run (``{"train.epochs": 5}``), validated with the
    spec; the run folder's ``spec.yaml`` is the spec as run. ``tags``: more Prefect tags on the run's flow runs.

    Re-running the spec of a failed run resumes it: the store already holds what was
    ingested and prepared, and training continues from its last finished epoch.
    Returns the run folder, the report path, the time per stage and the test metrics.
    """
    log = get_run_logger()
    pipeline_spec = load_spec(spec, overrides=overrides)
    with open_run(pipeline_spec.runs_dir, pipeline_spec.digest()) as run_dir:
        write_text_atomic(run_dir / "spec.yaml", yaml.safe_dump(pipeline_spec.model_dump(mode="json", by_alias=True), sort_keys=False))
        log.info("run %s of %s", run_dir.name, pipeline_spec.name)
        note_progress(run_dir=run_dir, flow_run_id=flow_run.get_id())
        tags = run_tags(pipeline_spec, run_dir) + [str(t)[:100] for t in (tags or [])][:20]
        _tag_flow_run(tags)
        try:
            with prefect_tags(*tags):  # every stage's flow and task runs carry them too
                result = _stages(pipeline_spec, run_dir, log)
        except BaseException as exc:
            write_status(run_dir, state="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        write_status(run_dir, state="completed", finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        return result


STAGE_FAULT_ENV = "MEDFLOW_FAULT_IN_STAGE"


def _fault_hook(stage: str) -> None:
    """Test hook: ``MEDFLOW_FAULT_IN_STAGE=<stage>=<SIGNAL>`` kills this process with the signal as the
    stage begins, as a native crash in that stage would."""
    import os
    import signal

    name, _, sig = os.environ.get(STAGE_FAULT_ENV, "").partition("=")
    if name == stage:
        signal.raise_signal(getattr(signal, sig))


def run_tags(spec, run_dir: Path) -> list[str]:
    """The tags that find one pipeline's flow runs together in the UI (filter by tag) and the API."""
    return [f"medflow-run:{run_dir.name}", f"spec:{spec.name}"]


def _tag_flow_run(tags: list[str]) -> None:
    """Add ``tags`` to this flow run (known only once the run folder exists, after the run began)."""
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.get_id(), tags=sorted(set(flow_run.get_tags()) | set(tags)))


def _stages(spec, run_dir: Path, log) -> dict:
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args):
        note_progress(stage=stage, work="")
        _fault_hook(stage)
        t0 = time.perf_counter()
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            out = fn(*args)
        seconds[stage] = round(time.perf_counter() - t0, 2)
        log.info("stage %s: %.1f s", stage, seconds[stage])
        return out

    # one writer from the scan to the last prepared array: no other run can slip in between stages
    with Store(spec.data.store).writer_lock(purpose="pipeline (ingest and preprocessing)"):
        ingested = timed("ingest", ingest_flow, spec)
        prep = timed("preprocess", preprocess_flow, spec)
    trained = timed("train", train_flow, spec, str(run_dir), prep["prep_key"])
    evaluation = timed("evaluate", evaluate_flow, spec, str(run_dir), prep["prep_key"], trained["split_csv"],
                       trained["model"])
    report = timed("report", report_flow, spec, str(run_dir), prep["prep_key"], dict(seconds), flow_run.get_id())
    publish_artifacts(str(run_dir))
    log.info("report: %s", report_link(report)[0])  # the run page's first tab (logs) shows it
    write_text_atomic(run_dir / "stages.json", json.dumps({"seconds": seconds, "ingest": ingested, "preprocess": prep,
                                                     "train": {k: trained[k] for k in ("epochs_trained",
                                                                                       "resumed_from_epoch")}},
                                                    indent=1))
    return {"run_dir": str(run_dir), "report": report, "stage_seconds": seconds, "ingest": ingested,
            "preprocess": prep, "train": trained, "task": spec.model.task, "test": evaluation["test"],
            "evaluation": evaluation}
