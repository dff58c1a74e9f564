"""Spec validation: errors name the field, echo the value and say what is allowed."""

from __future__ import annotations

import json

import pytest
import yaml

from medflow.cli import DEMO_SPEC
from medflow.errors import SpecError
from medflow.spec import json_schema, load_spec, parse_spec


def _spec(**over):
    base = yaml.safe_load(DEMO_SPEC.format(seed=1, epochs=3))
    for dotted, value in over.items():
        node = base
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return base


def test_demo_spec_is_valid_and_paths_resolve(tmp_path):
    spec = parse_spec(_spec(), base_dir=tmp_path, check_paths=False)
    assert spec.data.store == str(tmp_path / "store.zarr")
    assert spec.data.labels.path == str(tmp_path / "cohort" / "labels.csv")
    assert [name for name, _ in spec.steps()] == ["resample", "lung_mask", "window", "crop_pad"]
    assert spec.runs_dir == str(tmp_path / "runs")


@pytest.mark.parametrize(
    "override, field, fragment",
    [
        ({"train.epoch": 3}, "train.epoch", "unknown field; did you mean 'epochs'?"),
        ({"train.epochs": 0}, "train.epochs", "greater than 0"),
        ({"model.arch": "resnet9000"}, "model.arch", "expected one of: cnn3d"),
        ({"data.split.val": 0.6, "data.split.test": 0.4}, "data.split", "at least 10% for training"),
        ({"schedule": {"cron": "every night"}}, "schedule.cron", "invalid cron expression"),
        ({"evaluate.metrics": ["auc", "vibes"]}, "evaluate.metrics[1]", "'auc', 'accuracy'"),
    ],
)
def test_errors_name_field_value_and_allowed(override, field, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(**override), check_paths=False)
    line = next(p for p in info.value.problems if p.startswith(field + ":"))
    assert fragment in line and "received" in line


def test_bad_step_names_its_position():
    data = _spec()
    data["preprocess"][2] = {"window": {"center": -600, "width": -5}}
    data["preprocess"].append({"blur": {"sigma": 1}})
    with pytest.raises(SpecError) as info:
        parse_spec(data, check_paths=False)
    problems = "\n".join(info.value.problems)
    assert "preprocess[2].window.width: Input should be greater than 0 (received: -5)" in problems
    assert "preprocess[4]: each preprocess step is a mapping with exactly one key" in problems


def test_missing_paths_fail_before_work(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    with pytest.raises(SpecError, match="data.source: folder not found"):
        load_spec(path)


def test_schema_is_json_and_covers_every_section():
    schema = json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) == {"name", "data", "ingest", "preprocess", "augment", "model", "train",
                                         "evaluate", "run", "schedule"}
