"""Spec validation: errors name the field, echo the value and say what is allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
        ({"model.arch": "resnet9000"}, "model.arch", "expected one of: centernet2d, centernet3d, cnn3d"),
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
    assert "preprocess[4]: unknown step 'blur'; a step is one of: resample, lung_mask" in problems


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
    assert spec.metric_names() == ["dice", "iou", "hd95", "assd", "hd95_monai", "assd_monai", "volume_error"]
    assert parse_spec(_spec(), check_paths=False).metric_names()[0] == "auc"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"data.masks": None}, "segmentation needs data.masks"),
        ({"model.arch": "cnn3d"}, "'cnn3d' is a classification model; for segmentation use one of: unet2d, unet3d"),
        ({"train.patch_size": [16, 64, 64]}, "unet2d takes 2 (y, x)"),
        ({"data.split.folds": 3}, "k-fold ensembles are built for classification and signal runs"),
        ({"evaluate.calibrate": "platt"}, "calibrates class scores; segmentation has none"),
        ({"evaluate.metrics": ["dice", "auc"]}, "['auc'] do not apply to segmentation"),
        ({"data.masks": {"source": "nifti"}}, "data.masks.table is required"),
        ({"train.foreground_ratio": 1.5}, "train.foreground_ratio"),
    ],
)
def test_segmentation_spec_errors(override, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(_seg_spec(**override), check_paths=False)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "override, fragment",
    [({"train.epochs": 10**9}, "train.epochs: must be at most 10,000 (early stopping"),
     ({"evaluate.bootstrap": 10**12}, "evaluate.bootstrap: must be at most 100,000"),
     ({"run.dask.n_workers": 100000}, "run.dask.n_workers: must be at most 512"),
     ({"preprocess.3.crop_pad.shape": [100000, 100000, 100000]}, "crop_pad.shape[0]: must be at most 4,096"),
     ({"preprocess.3.crop_pad.shape": [2048, 2048, 2048]}, "8,589,934,592 voxels; at most 1,073,741,824"),
     ({"preprocess.0.resample.spacing": [0.0001, 1, 1]}, "spacing[0]: must be at least 0.01"),
     ({"run.retries": 1000}, "run.retries: must be at most 10")],
)
def test_numbers_are_bounded_with_the_reason(override, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(**override), check_paths=False)
    assert any(fragment in line for line in info.value.problems), info.value.problems


@pytest.mark.parametrize("text", ["name: t\nx: &a [*a, *a]\n",  # a loop
                                  "name: t\na: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a]\n"
                                  "c: &c [*b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c]\n"])  # a bomb
def test_yaml_aliases_are_refused_at_once(tmp_path, text):
    import time

    path = tmp_path / "spec.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"YAML aliases \(\*a\) are not accepted"):
        load_spec(path)
    assert time.perf_counter() - t0 < 5  # refused while reading, not after expanding


def _checked_spec(tmp_path, labels_csv: str, **over):
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "a.dcm").write_bytes(b"\0" * 200)  # a source with a file (what is in it is ingest's)
    (tmp_path / "labels.csv").write_text(labels_csv)
    data = _spec(**over)
    data["data"].update({"source": "src", "labels": {**data["data"]["labels"], "path": "labels.csv"}})
    return parse_spec(data, base_dir=tmp_path)


def test_preflight_reads_the_label_file_and_the_store(tmp_path):
    from filelock import FileLock

    from medflow.preflight import preflight
    from storage.store import Store

    good = "StudyInstanceUID,nodule\n1.2.3,1\n1.2.4,0\n"
    assert preflight(_checked_spec(tmp_path, good)) == []
    problems = preflight(_checked_spec(tmp_path, "Study,nodule\n1.2.3,1\n"))
    assert problems == ["data.labels: the CSV has no column 'StudyInstanceUID' (key_column); its columns are "
                        "['Study', 'nodule']"]
    problems = preflight(_checked_spec(tmp_path, good, **{"data.labels.classes": ["0", "2"]}))
    assert problems == ["data.labels.classes: labels ['1'] in the CSV are not among the classes ['0', '2']"]
    spec = _checked_spec(tmp_path, good)
    Store(spec.data.store)
    lock = FileLock(str(tmp_path / "store.zarr" / ".medflow" / "writer.lock"), thread_local=False)
    with lock:  # another writer
        problems = preflight(spec)
    assert len(problems) == 1 and problems[0].startswith("data.store: store ") and "being written" in problems[0]
    (tmp_path / "store.zarr" / ".tmp" / "left").mkdir()
    assert preflight(spec) == []  # free again; and checking it wrote nothing (a writer's leftovers stay)
    assert (tmp_path / "store.zarr" / ".tmp" / "left").exists()


def test_cli_refuses_a_busy_store_in_one_message(tmp_path):
    from filelock import FileLock
    from typer.testing import CliRunner

    from medflow.cli import app
    from storage.store import Store

    spec = _checked_spec(tmp_path, "StudyInstanceUID,nodule\n1.2.3,1\n1.2.4,0\n")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    Store(spec.data.store)
    with FileLock(str(tmp_path / "store.zarr" / ".medflow" / "writer.lock"), thread_local=False):
        result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "being written by another run" in result.output and "Traceback" not in result.output
    assert result.output.count("being written") == 1 and len(result.output.splitlines()) < 10


def test_expected_errors_are_logged_once_without_a_traceback():
    import logging
    import sys

    from medflow.settings import QuietExpectedErrors
    from storage.errors import StoreLockedError

    quiet = QuietExpectedErrors()

    def record(exc):
        try:
            raise exc
        except Exception:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, "", 0, "Encountered exception: %r",
                                     (exc,), sys.exc_info())

    busy = StoreLockedError("store 's.zarr' is being written by another run")
    first, again = record(busy), record(busy)
    assert quiet.filter(first) and first.exc_info is None  # the message stays, the traceback goes
    assert not quiet.filter(again)  # the enclosing flow's copy of it is dropped
    bug = record(KeyError("x"))
    assert quiet.filter(bug) and bug.exc_info is not None  # an unexpected error keeps its traceback


def test_preflight_estimates_the_largest_prepared_array_from_the_catalog(tmp_path, monkeypatch):
    import json as _json

    import medflow.preflight as pf
    from storage.store import Store

    over = {"preprocess": [{"resample": {"spacing": [0.5, 0.5, 0.5]}}, {"window": {"center": 40, "width": 400}},
                           {"crop_pad": {"shape": [1500, 717, 717]}}]}
    spec = _checked_spec(tmp_path, "StudyInstanceUID,nodule\n1.2.3,1\n1.2.4,0\n", **over)
    store = Store(spec.data.store)
    entry = {"series_key": "s1", "shape": [300, 512, 512], "spacing": [2.5, 0.7, 0.7], "patient_key": "p",
             "study_key": "s"}
    (store.root / "catalog" / "s1.json").write_text(_json.dumps(entry))
    monkeypatch.setattr(pf, "_worker_memory", lambda spec: 8 * 2**30)
    problems = pf.preflight(spec)
    # resampled to 0.5 mm the series needs more than a quarter of an 8 GiB worker, not of a 64 GiB one
    assert len(problems) == 1 and problems[0].startswith("preprocess: the largest prepared array of the store's "
                                                         "series is [1500, 717, 717] (2.9 GiB as float32)")
    monkeypatch.setattr(pf, "_worker_memory", lambda spec: 64 * 2**30)
    assert pf.preflight(spec) == []


def test_multi_worker_is_refused_where_the_kind_cannot_start_workers():
    from pathlib import Path

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "tumours.yaml").read_text())
    data["train"]["distribute"] = "multi_worker"
    with pytest.raises(SpecError) as info:
        parse_spec(data, check_paths=False)
    assert any(p.startswith("train.distribute: multi_worker is not available for segmentation")
               for p in info.value.problems), info.value.problems
    spec = parse_spec(_spec(**{"train.distribute": "multi_worker", "train.workers": 3}), check_paths=False)
    assert spec.train.workers == 3  # classification starts its workers


@pytest.mark.parametrize(
    "override, field, fragment",
    [
        ({"name": "x" * 100_000}, "name", "at most 100 characters"),
        ({"data.store": "ftp://host/store.zarr"}, "data.store", "a store is a folder or a URL of one of"),
        ({"data.source": "http://elsewhere/dicom"}, "data.source", "a source is a folder or a DICOMweb server"),
        ({"data.labels.label_column": "y" * 5000}, "data.labels.label_column", "at most 4096 characters"),
        ({"model.params": {"filterz": [4, 8]}}, "model", "'filterz' (did you mean 'filters'?) not a parameter of cnn3d"),
        ({"model.params": {"filters": [1e8, 1e8]}}, "model", "filters=[100000000.0, 100000000.0]: numbers must be"),
    ],
)
def test_spec_limits_refuse_at_validate_with_a_short_message(override, field, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(**override), check_paths=False)
    line = next(p for p in info.value.problems if p.startswith(field + ":") or p.startswith(field + "."))
    assert fragment in line, line
    assert len(str(info.value)) < 1000  # the 100,000-character value is not echoed whole


@pytest.mark.parametrize("text, fragment", [
    ("name: a\nname: b\n", "key 'name' is given twice"),
    ("x: " + "[" * 50_000 + "]" * 50_000 + "\n", "nests more than 12 levels deep"),
])
def test_duplicate_keys_and_deep_nesting_are_refused(tmp_path, text, fragment):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=fragment):
        load_spec(path, check_paths=False)


def test_a_store_that_cannot_be_written_is_found_by_validate(tmp_path, monkeypatch):
    import os

    (tmp_path / "cohort" / "dicom").mkdir(parents=True)
    (tmp_path / "cohort" / "labels.csv").write_text("StudyInstanceUID,nodule\n1,0\n")
    (tmp_path / "blocked").write_text("a file where the store's folder should be")
    with pytest.raises(SpecError, match="data.store: .*is not a folder"):
        parse_spec(_spec(**{"data.store": "blocked/store.zarr"}), base_dir=tmp_path)
    (tmp_path / "readonly").mkdir()
    real_access = os.access  # as root every folder is writable: stand in for a read-only mount
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("readonly") else real_access(p, mode))
    with pytest.raises(SpecError, match="data.store: folder .*readonly' is not writable"):
        parse_spec(_spec(**{"data.store": "readonly/store.zarr"}), base_dir=tmp_path)
    assert parse_spec(_spec(), base_dir=tmp_path).data.store == str(tmp_path / "store.zarr")


def _steps(data, steps):
    data["preprocess"] = steps(data["preprocess"])
    return data


@pytest.mark.parametrize("change, field, fragment", [
    (lambda d: _steps(d, lambda s: [s[0], {"lungmask": {"threshold": -400}}, *s[2:]]), "preprocess[1]",
     "did you mean 'lung_mask'?"),
    (lambda d: _override(d, {"model.arch": "resnet2d", "model.params": {}}), "model.arch",
     "resnet2d is a 2D model and ingest.modalities (CT)"),
    (lambda d: _steps(d, lambda s: s[:3]), "preprocess", "cnn3d takes arrays of one shape; add a crop_pad"),
    (lambda d: _override(d, {"data.source": "empty"}), "data.source", "holds no files"),
    (lambda d: _override(d, {"data.split.from": "layout"}), "data.split.from",
     "layout needs data.layout: folders"),
    (lambda d: _override(d, {"data.layout": "folders"}), "data.layout", "holds image or volume files"),
])
def test_validate_refuses_at_once_what_used_to_fail_minutes_into_a_run(tmp_path, change, field, fragment):
    """Each in one line with its field, exit status 2, before anything runs."""
    from typer.testing import CliRunner

    from medflow.cli import app

    (tmp_path / "cohort" / "dicom").mkdir(parents=True)
    (tmp_path / "cohort" / "dicom" / "a.dcm").write_bytes(b"\0" * 200)
    (tmp_path / "cohort" / "labels.csv").write_text("StudyInstanceUID,nodule\n1.2.3,0\n1.2.4,1\n")
    (tmp_path / "empty").mkdir()
    data = change(_spec())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith("•")]
    assert len(lines) == 1 and lines[0].split("• ", 1)[1].startswith(field + ":") and fragment in lines[0], lines


def test_waveform_steps_are_refused_for_image_kinds():
    data = _spec()
    data["preprocess"] += [{"notch": {"freq": [50.0]}}, {"select_leads": {"leads": ["I"]}}]
    with pytest.raises(SpecError, match="preprocess: notch, select_leads are waveform steps; classification "
                                        "prepares images"):
        parse_spec(data, check_paths=False)


def test_the_cli_has_a_version_and_lists_its_choices():
    from typer.testing import CliRunner

    from medflow import __version__
    from medflow.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.strip() == f"medflow {__version__}"
    bad = runner.invoke(app, ["synth", "out", "--kind", "mri"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "'mri' is not one of 'ct', 'xray', 'ecg'" in bad.output
    assert runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output.count("--install-completion") == 1


def test_a_full_disk_ends_a_run_in_one_line_naming_the_stage(tmp_path, monkeypatch):
    """What `medflow run` prints when the disk fills: the stage and the cause in one line, the traceback in the
    log file only (the measured console output is in the README)."""
    import errno
    import json
    import logging
    import sys

    import typer

    from medflow.cli import _expected_errors
    from medflow.runs import PROGRESS_ENV
    from medflow.settings import QuietExpectedErrors, expected_cause

    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps({"stage": "ingest"}))
    monkeypatch.setenv(PROGRESS_ENV, str(progress))
    monkeypatch.setenv("MEDFLOW_VERBOSE", "1")  # leave this session's log handlers as they are
    full = OSError(errno.ENOSPC, "No space left on device", "/data/store.zarr/series/x")
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = full
    assert expected_cause(wrapped) is full and expected_cause(KeyError("x")) is None
    try:
        raise wrapped
    except RuntimeError:
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, "", 0, "Task run failed: %r", (wrapped,),
                                   sys.exc_info())
    assert QuietExpectedErrors().filter(record) and record.exc_info is None
    assert "the disk is full (ENOSPC) writing /data/store.zarr/series/x" in record.getMessage()
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    monkeypatch.setattr("medflow.cli.err", Console(file=out, width=400))
    with pytest.raises(typer.Exit) as exit_info:
        with _expected_errors(tmp_path / "run.log"):
            raise wrapped
    lines = out.getvalue().strip().splitlines()
    assert exit_info.value.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("stage ingest: OSError: the disk is full (ENOSPC)") and "run.log" in lines[0]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with _expected_errors():
            raise KeyError("x")


def test_validate_finds_labels_that_match_no_file_of_the_source_and_caches_no_identifier(tmp_path, monkeypatch):
    """The run used to fail at the train stage with "no series in the store matches a row of labels.csv"."""
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file
    from typer.testing import CliRunner

    from medflow.cli import app

    ct = get_testdata_file("CT_small.dcm")
    uid = str(pydicom.dcmread(ct).StudyInstanceUID)
    (tmp_path / "cohort" / "dicom" / "study").mkdir(parents=True)
    shutil.copy(ct, tmp_path / "cohort" / "dicom" / "study" / "ct.dcm")
    (tmp_path / "cohort" / "dicom" / "notes.txt").write_text("not DICOM")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    cache = tmp_path / "cache"
    env = {"COLUMNS": "400", "MEDFLOW_CACHE": str(cache)}
    runner = CliRunner()
    for rows in ("1.2.3,0\n1.2.4,1\n", f"{uid.replace('.', '-')},0\n1.2.4,1\n"):  # none is the file's UID
        (tmp_path / "cohort" / "labels.csv").write_text("StudyInstanceUID,nodule\n" + rows)
        result = runner.invoke(app, ["validate", str(path)], env=env)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip().startswith("•")]
        assert len(lines) == 1 and "data.labels: none of the 2 values in column 'StudyInstanceUID' is the " \
            "StudyInstanceUID of a file in data.source (1 DICOM files read)" in lines[0], lines
    (tmp_path / "cohort" / "labels.csv").write_text(f"StudyInstanceUID,nodule\n{uid},0\n1.2.4,1\n")
    result = runner.invoke(app, ["validate", str(path)], env=env)
    assert result.exit_code == 0, result.output
    cached = "".join(p.read_text() for p in (cache / "keys").iterdir())
    assert uid not in cached and "study" not in cached and "ct.dcm" not in cached  # salted hashes only


def test_a_missing_cohort_is_refused_with_how_to_make_it():
    """examples/nodules.yaml on a fresh clone: its cohort is made by the command in its header."""
    from medflow.errors import SpecError

    examples = Path(__file__).parents[2] / "examples"
    if (examples / "cohort").exists():
        pytest.skip("examples/cohort was made in this checkout")
    with pytest.raises(SpecError) as info:
        load_spec(examples / "nodules.yaml")
    hint = info.value.problems[-1]
    assert hint.startswith("data: the spec's header says how to make its data: `medflow synth examples/cohort")


def test_a_missing_source_without_a_recipe_says_how_to_point_at_data(tmp_path):
    from medflow.errors import SpecError

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "medflow synth DIR" in info.value.problems[-1] and str(tmp_path) in info.value.problems[-1]


def test_help_names_its_placeholders():
    """Not Typer's `<int>`, `<list[Path]>` or `<bool>` after a flag: `--port PORT`, choices as they are."""
    import subprocess
    import sys

    medflow = Path(sys.executable).parent / "medflow"
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    server = subprocess.run([str(medflow), "server", "--help"], capture_output=True, text=True, env=env).stdout
    synth = subprocess.run([str(medflow), "synth", "--help"], capture_output=True, text=True, env=env).stdout
    assert "--port" in server and "PORT" in server and "REPORTS_ROOT" in server
    for text in (server, synth):
        options = [line for line in text.splitlines() if line.lstrip("│ ").startswith("--")]
        assert len(options) >= 4 and not [o for o in options if re.search(r"<(int|bool|str|path|list\[Path\])>", o)]
    assert "<dicom|png>" in synth  # an Enum's choices stay listed
