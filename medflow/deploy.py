"""Deployments from ``deployments/prefect.yaml``, served from one process (``medflow serve``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from medflow.errors import SpecError
from medflow.spec import load_spec

logger = logging.getLogger(__name__)
PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_FILE = PROJECT_DIR / "deployments" / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentDef:
    """One entry of prefect.yaml, with the spec and schedule it will run with."""

    flow_name: str
    name: str
    entrypoint: str
    spec: str | None  # None for a flow without a `spec` parameter (predict)
    cron: str | None
    timezone: str
    description: str
    parameters: dict | None = None  # the other default parameters

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


def read_deployments(path: str | Path = DEFAULT_FILE, *, spec: str | Path | None = None) -> list[DeploymentDef]:
    """The deployments of a prefect.yaml, with ``spec`` (if given) as every deployment's spec.

    The spec is validated; when it names ``schedule.cron``, scheduled deployments of the
    ``pipeline`` flow use it instead of the file's cron.

    Raises:
        SpecError: the file or a spec is invalid.
    """
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read deployments file {str(path)!r}: {exc}") from exc
    base = path.resolve().parent.parent  # entrypoints and relative specs are relative to the project
    out = []
    for entry in config.get("deployments", []):
        schedules = entry.get("schedules") or []
        cron = schedules[0]["cron"] if schedules else None
        timezone = schedules[0].get("timezone", "UTC") if schedules else "UTC"
        module, func = entry["entrypoint"].split(":")
        flow_name = _flow_name(base / module, func)
        params = dict(entry.get("parameters") or {})
        if "spec" not in params:  # e.g. predict: its parameters are given per run
            out.append(DeploymentDef(flow_name=flow_name, name=entry["name"], entrypoint=str(base / module) + ":" + func,
                                     spec=None, cron=cron, timezone=timezone,
                                     description=entry.get("description", ""), parameters=params))
            continue
        spec_path = Path(spec) if spec else Path(params["spec"])
        if not spec_path.is_absolute():
            spec_path = (Path.cwd() if spec else base) / spec_path
        pipeline_spec = load_spec(spec_path, check_paths=False)
        if schedules and pipeline_spec.schedule and flow_name == "pipeline":
            # the spec's schedule is the pipeline's; stage deployments keep their own
            cron, timezone = pipeline_spec.schedule.cron, pipeline_spec.schedule.timezone
        out.append(DeploymentDef(
            flow_name=flow_name, name=entry["name"], entrypoint=str(base / module) + ":" + func,
            spec=str(spec_path), cron=cron, timezone=timezone, description=entry.get("description", ""),
        ))
    return out


def _flow_name(module_path: Path, func: str) -> str:
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(f"{module_path}:{func}").name


def to_runner_deployments(defs: list[DeploymentDef]) -> list:
    """Prefect ``RunnerDeployment`` objects, ready for ``prefect.serve``."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    out = []
    for d in defs:
        flow = load_flow_from_entrypoint(d.entrypoint)
        out.append(flow.to_deployment(
            name=d.name,
            schedule=Cron(d.cron, timezone=d.timezone) if d.cron else None,
            parameters={"spec": d.spec} if d.spec else dict(d.parameters or {}),
            description=d.description,
            enforce_parameter_schema=True,
            tags=["medflow"],
        ))
    return out
