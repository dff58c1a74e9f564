"""The report flow: HTML report, provenance and Prefect artifacts."""

from __future__ import annotations

from prefect import flow

from medflow.spec import PipelineSpec
from tasks.report import render_report_task


@flow(name="report")
def report_flow(spec: PipelineSpec, run_dir: str, prep_key: str, stage_seconds: dict[str, float],
                flow_run_id: str | None = None) -> str:
    return render_report_task(spec, run_dir, prep_key, stage_seconds, flow_run_id)
