"""The whole lifecycle as one flow of subflows: ingest → preprocess → train → evaluate → report.

The flows are synchronous on purpose. With Prefect's embedded SQLite server a sync subflow
costs ~1.2 s of overhead (its heartbeat thread is joined at exit, in 1 s steps). An async
subflow skips the join, but its parent task-run insert then usually collides with the server
recording the previous subflow ("database is locked", HTTP 503) and the client retries after
~2 s. Measured with Prefect 3.8.8: sync 1.2 s steady; async 0.2 to 2.6 s, mostly about 2 s.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import yaml
from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.preprocess import preprocess_flow
from flows.report import report_flow
from flows.train import train_flow
from medflow.spec import load_spec


def new_run_dir(runs_dir: str, spec_digest: str) -> Path:
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{spec_digest[:6]}-{uuid.uuid4().hex[:4]}"
    path = Path(runs_dir) / run_id
    path.mkdir(parents=True)
    return path


@flow(name="pipeline")
def pipeline(spec_path: str) -> dict:
    """Run the whole lifecycle for the spec at ``spec_path``; returns the run folder and report path."""
    log = get_run_logger()
    spec = load_spec(spec_path)
    run_dir = new_run_dir(spec.runs_dir, spec.digest())
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    log.info("run %s of %s", run_dir.name, spec.name)
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[stage] = round(time.perf_counter() - t0, 2)
        log.info("stage %s: %.1f s", stage, seconds[stage])
        return out

    ingested = timed("ingest", ingest_flow, spec)
    prep = timed("preprocess", preprocess_flow, spec)
    trained = timed("train", train_flow, spec, str(run_dir), prep["prep_key"])
    evaluation = timed("evaluate", evaluate_flow, spec, str(run_dir), prep["prep_key"], trained["split_csv"],
                       trained["model"])
    report = timed("report", report_flow, spec, str(run_dir), prep["prep_key"], dict(seconds), flow_run.get_id())
    (run_dir / "stages.json").write_text(json.dumps({"seconds": seconds, "ingest": ingested, "preprocess": prep}, indent=1))
    return {"run_dir": str(run_dir), "report": report, "stage_seconds": seconds, "ingest": ingested,
            "preprocess": prep, "test": evaluation["test"]}
