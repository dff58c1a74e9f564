"""The JSON Schema, the README's spec reference, example specs and deployments stay in step."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from medflow.deploy import read_deployments
from medflow.reference import END, START, readme_block
from medflow.spec import json_schema, load_spec

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_readme_spec_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme
    block = readme[readme.index(START):readme.index(END) + len(END)]
    assert block == readme_block(), "README spec reference is stale: run `medflow schema --markdown`"


def test_every_spec_field_is_in_the_reference():
    block = readme_block()
    for section in ("data.source", "ingest.deidentify", "preprocess[].window.center", "train.class_weight",
                    "evaluate.threshold", "run.dask.address", "schedule.cron"):
        assert f"`{section}`" in block


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_specs_validate(path):
    data = yaml.safe_load(path.read_text())
    jsonschema.validate(data, json_schema())
    load_spec(path, check_paths=False)


def test_deployments_file_is_valid_and_uses_spec_schedules():
    defs = {d.full_name: d for d in read_deployments(ROOT / "deployments" / "prefect.yaml")}
    assert set(defs) == {"pipeline/nightly", "pipeline/adhoc", "ingest/hourly", "predict/adhoc"}
    assert defs["pipeline/adhoc"].cron is None
    assert defs["predict/adhoc"].spec is None and defs["predict/adhoc"].cron is None  # model/input/output per run
    defs.pop("predict/adhoc")
    spec = load_spec(defs["pipeline/nightly"].spec, check_paths=False)
    assert defs["pipeline/nightly"].cron == spec.schedule.cron  # the spec's schedule wins for the pipeline
    assert defs["ingest/hourly"].cron == "0 * * * *"  # stage deployments keep their own
    for d in defs.values():
        jsonschema.validate(yaml.safe_load(Path(d.spec).read_text()), json_schema())
