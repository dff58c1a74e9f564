"""Spec validation: errors name the field, echo the value and say what is allowed."""

from __future__ import annotations

import json

import pytest
import yaml

from medflow.cli import DEMO_SPEC
from medflow.errors import SpecError
from medflow.spec import json_schema, load_spec, parse_spec


def _spec(**over):
    return _override(yaml.safe_load(DEMO_SPEC.format(seed=1, epochs=3)), over)


def _override(base: dict, over: dict) -> dict:
    """``base`` with dotted keys set (or deleted, for None)."""
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
        ({"evaluate.metrics": ["auc", "vibes"]}, "evaluate.metrics", "['vibes'] do not apply to classification"),
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


def _seg_spec(**over):
    from medflow.cli import SEG_DEMO_SPEC

    return _override(yaml.safe_load(SEG_DEMO_SPEC.format(seed=1, epochs=3)), over)


def test_segmentation_demo_spec_is_valid_with_the_task_metrics(tmp_path):
    spec = parse_spec(_seg_spec(**{"evaluate.metrics": None}), base_dir=tmp_path, check_paths=False)
    assert spec.model.task == "segmentation" and spec.data.masks.source == "seg"
    assert spec.metric_names() == ["dice", "iou", "hd95", "assd", "volume_error"]
    assert parse_spec(_spec(), check_paths=False).metric_names()[0] == "auc"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"data.masks": None}, "segmentation needs data.masks"),
        ({"model.arch": "cnn3d"}, "'cnn3d' is a classification model; for segmentation use one of: unet2d, unet3d"),
        ({"train.patch_size": [16, 64, 64]}, "unet2d takes 2 (y, x)"),
        ({"evaluate.metrics": ["dice", "auc"]}, "['auc'] do not apply to segmentation"),
        ({"data.masks": {"source": "nifti"}}, "data.masks.table is required"),
        ({"train.foreground_ratio": 1.5}, "train.foreground_ratio"),
    ],
)
def test_segmentation_spec_errors(override, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(_seg_spec(**override), check_paths=False)
    assert fragment in str(info.value)
