"""The ``medflow`` command line."""

from __future__ import annotations

import gc
import json
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medflow import settings

app = typer.Typer(no_args_is_help=True, help="Declarative medical-imaging DL pipelines on Prefect.")


def _print_version(value: bool) -> None:
    if value:
        from medflow import __version__

        console.print(f"medflow {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print medflow's version and exit.")] = False) -> None:
    """Declarative medical-imaging DL pipelines on Prefect."""


class SynthKind(str, Enum):
    ct = "ct"
    xray = "xray"
    ecg = "ecg"


class ImageFormat(str, Enum):
    dicom = "dicom"
    png = "png"


class DemoTask(str, Enum):
    classification = "classification"
    segmentation = "segmentation"
    detection = "detection"
    xray = "xray"
    detection2d = "detection2d"
    ecg = "ecg"
console = Console()
err = Console(stderr=True)

DEMO_SPEC = """\
# The demo pipeline: nodule present / absent on a synthetic chest-CT cohort.
name: demo-nodules
data:
  source: cohort/dicom
  labels: {{path: cohort/labels.csv, key: StudyInstanceUID, label_column: nodule}}
  store: store.zarr
  split: {{val: 0.2, test: 0.2, by: patient, stratify: true, seed: {seed}}}
ingest: {{deidentify: true, modalities: [CT], min_slices: 8}}
preprocess:
  - resample: {{spacing: [4.0, 4.0, 4.0]}}
  - lung_mask: {{threshold: -400}}
  - window: {{center: -600, width: 1500}}
  - crop_pad: {{shape: [48, 80, 80], value: 0}}
augment: {{flip: [x], shift: 3, intensity_jitter: 0.05}}
model: {{task: classification, arch: cnn3d, params: {{filters: [8, 16, 32, 64]}}}}
train: {{epochs: {epochs}, batch_size: 8, optimizer: adam, learning_rate: 0.002, early_stopping: 8, reduce_lr: 4,
        class_weight: balanced, seed: {seed}, deterministic: true}}
evaluate: {{metrics: [auc, accuracy, precision, recall, specificity, f1], bootstrap: 1000, threshold: youden_median,
           baselines: [radiomics]}}
run: {{retries: 2, dask: {{n_workers: 2, threads_per_worker: 1}}}}
"""


SEG_DEMO_SPEC = """\
# The segmentation demo: lung tumours on a synthetic chest-CT cohort, masks from DICOM SEG.
name: demo-tumours
data:
  source: cohort/dicom
  masks: {{source: seg, missing: empty}}
  store: store.zarr
  split: {{val: 0.2, test: 0.2, by: patient, stratify: true, seed: {seed}}}
ingest: {{deidentify: true, modalities: [CT], min_slices: 8}}
preprocess:
  - lung_mask: {{threshold: -400}}
  - window: {{center: -600, width: 1500}}
augment: {{flip: [x, y], intensity_jitter: 0.05}}
model: {{task: segmentation, arch: unet2d, params: {{filters: [16, 32, 64, 128], norm: batch}}}}
train: {{epochs: {epochs}, batch_size: 16, optimizer: adam, learning_rate: 0.002, early_stopping: 6, reduce_lr: 3,
        samples_per_volume: 8, foreground_ratio: 0.5, seed: {seed}}}
evaluate: {{metrics: [dice, iou, hd95, assd, hd95_monai, assd_monai, volume_error], bootstrap: 1000}}
run: {{retries: 2, dask: {{n_workers: 2, threads_per_worker: 1}}}}
"""


DET_DEMO_SPEC = """\
# The detection demo: lung nodules on the synthetic chest-CT cohort (vessels, granulomas, ground-glass and
# juxtapleural nodules), marks from DICOM SR (TID 1500), a CenterNet-style 3D detector, FROC against a baseline.
name: demo-detection
data:
  source: cohort/dicom
  marks: {{source: sr}}
  store: store.zarr
  split: {{val: 0.2, test: 0.2, by: patient, stratify: true, seed: {seed}}}
ingest: {{deidentify: true, modalities: [CT], min_slices: 8}}
preprocess:
  - resample: {{spacing: [4.0, 4.0, 4.0]}}
  - lung_mask: {{threshold: -400, dilate_mm: 6}}
  - window: {{center: -600, width: 1500}}
  - crop_pad: {{shape: [56, 72, 88], value: 0}}
augment: {{flip: [x, y], intensity_jitter: 0.05}}
model: {{task: detection, arch: centernet3d, params: {{filters: [8, 16, 32], norm: batch}}}}
train: {{epochs: {epochs}, batch_size: 8, optimizer: adam, learning_rate: 0.003, early_stopping: 8, reduce_lr: 4,
        patch_size: [16, 32, 32], samples_per_volume: 4, foreground_ratio: 0.6, seed: {seed}}}
evaluate: {{bootstrap: 1000}}
run: {{retries: 2, dask: {{n_workers: 2, threads_per_worker: 1}}}}
"""


XRAY_DEMO_SPEC = """\
# The chest X-ray demo: normal / pneumonia / pleural effusion on synthetic DX and CR radiographs.
name: demo-xray
data:
  source: cohort/images
  labels: {{path: cohort/labels.csv, key: StudyInstanceUID, label_column: finding,
           classes: [normal, pneumonia, effusion]}}
  store: store.zarr
  split: {{val: 0.15, test: 0.2, by: patient, stratify: true, seed: {seed}}}
ingest: {{deidentify: true, modalities: [DX, CR]}}
preprocess:
  - resize2d: {{shape: [128, 128], aspect: pad}}
  - rescale: {{}}
augment: {{shift: 4, zoom: 0.05, contrast: 0.1, intensity_jitter: 0.05}}
model: {{task: classification, arch: resnet2d, params: {{filters: [16, 32, 64, 128], blocks: 1}}}}
train: {{epochs: {epochs}, batch_size: 32, optimizer: adam, learning_rate: 0.001, early_stopping: 8, reduce_lr: 3,
        class_weight: balanced, seed: {seed}}}
evaluate: {{metrics: [auc, accuracy, precision, recall, specificity, f1], bootstrap: 1000,
           baselines: [radiomics, hog]}}
run: {{retries: 2, dask: {{n_workers: 2, threads_per_worker: 1}}}}
"""

DET2D_DEMO_SPEC = """\
# The box-detection demo: pneumonia consolidations on synthetic chest X-rays (DX and CR; effusions and normal
# images have no box), boxes from a CSV, a CenterNet-style 2D detector, COCO average precision against a baseline.
name: demo-xray-boxes
data:
  source: cohort/images
  marks: {{source: csv, table: cohort/boxes.csv}}
  store: store.zarr
  split: {{val: 0.15, test: 0.2, by: patient, stratify: true, seed: {seed}}}
ingest: {{deidentify: true, modalities: [DX, CR]}}
preprocess:
  - resize2d: {{shape: [128, 128], aspect: pad}}
  - rescale: {{}}
augment: {{flip: [x], intensity_jitter: 0.05}}
model: {{task: detection2d, arch: centernet2d, params: {{filters: [16, 32, 64], head: 32}}}}
train: {{epochs: {epochs}, batch_size: 16, optimizer: adam, learning_rate: 0.002, early_stopping: 8, reduce_lr: 3,
        seed: {seed}}}
evaluate: {{bootstrap: 1000}}
run: {{retries: 2, dask: {{n_workers: 2, threads_per_worker: 1}}}}
"""

ECG_DEMO_SPEC = """\
# The ECG demo: normal sinus rhythm / atrial fibrillation / bundle branch block on synthetic 12-lead ECGs.
name: demo-ecg
data:
  source: cohort/dicom
  labels: {{path: cohort/labels.csv, key: StudyInstanceUID, label_column: rhythm, classes: [normal, afib, bbb]}}
  store: store.zarr
  split: {{val: 0.15, test: 0.2, by: patient, stratify: true, seed: {seed}}}
ingest: {{deidentify: true, modalities: [ECG]}}
preprocess:
  - baseline: {{cutoff: 0.5}}
  - notch: {{freq: [50, 60]}}
  - bandpass: {{low: 0.5, high: 40}}
  - resample_signal: {{rate: 100}}
  - normalize_leads: {{}}
  - crop_pad_signal: {{seconds: 10}}
augment: {{intensity_jitter: 0.05}}
model: {{task: signal, arch: cnn_gru, params: {{filters: [32, 64, 64], units: 48}}}}
train: {{epochs: {epochs}, batch_size: 32, optimizer: adam, learning_rate: 0.002, early_stopping: 8, reduce_lr: 3,
        class_weight: balanced, seed: {seed}}}
evaluate: {{metrics: [auc, accuracy, precision, recall, specificity, f1], bootstrap: 1000,
           baselines: [ecg_features]}}
run: {{retries: 2, dask: {{n_workers: 2, threads_per_worker: 1}}}}
"""

# task -> (spec template, default cohort size, default work folder, default epochs)
DEMOS = {
    "classification": (DEMO_SPEC, 150, "work/demo", 30),
    "segmentation": (SEG_DEMO_SPEC, 60, "work/demo-segmentation", 30),
    "detection": (DET_DEMO_SPEC, 150, "work/demo-detection", 30),
    "xray": (XRAY_DEMO_SPEC, 600, "work/demo-xray", 40),
    "detection2d": (DET2D_DEMO_SPEC, 450, "work/demo-detection2d", 30),
    "ecg": (ECG_DEMO_SPEC, 450, "work/demo-ecg", 30),
}


def _fail_spec(exc) -> None:
    if exc.problems == [exc.args[0]]:  # one problem: its message alone
        err.print(f"[bold red]{exc.args[0]}[/]")
    else:
        err.print(f"[bold red]{exc.args[0].splitlines()[0]}[/]")
        for line in exc.problems:
            err.print(f"  • {line}")
    raise typer.Exit(2)


def _load_checked(spec_path: Path):
    """The spec, validated and checked against its files and store (``medflow.preflight``), or exit 2."""
    from medflow.errors import SpecError
    from medflow.preflight import preflight
    from medflow.spec import load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        _fail_spec(exc)
    problems = preflight(spec)
    if problems:
        _fail_spec(SpecError(f"{spec_path}: cannot run as it stands", problems))
    return spec


def _run_pipeline(spec_path: Path) -> dict:
    import os

    spec = _load_checked(spec_path)
    settings.configure(Path(spec.runs_dir).parent)
    settings.import_tensorflow_quietly(verbose=bool(os.environ.get(VERBOSE_ENV)))  # before any thread or child
    from medflow import api_server
    from medflow.dask_runtime import prepare_local_workers

    api_server.start_early()
    prepare_local_workers(spec.run.dask.model_dump(), spec.data.store)  # in the background, while Prefect starts
    from flows.pipeline import pipeline

    api_server.wait()
    import prefect.logging.configuration as prefect_logging

    prefect_logging.setup_logging()  # as the flow would, so the file handler below is not replaced
    log_file = settings.log_to_file(Path(spec.runs_dir).parent / "logs" / f"medflow-run-{time.strftime('%Y%m%d-%H%M%S')}.log")
    try:
        with _expected_errors(log_file):
            return pipeline(str(spec_path))
    finally:
        api_server.stop()


@contextmanager
def _expected_errors(log_file: Path | None = None):
    """A failure with a clear cause (``settings.expected_errors``: a bad spec or labels, a busy store, a
    missing source) ends the command with its message, once, and exit status 1; Prefect's log lines
    for it carry no traceback (``settings.quiet_expected_errors``). Anything else keeps its traceback."""
    import os

    if not os.environ.get(VERBOSE_ENV):
        settings.quiet_expected_errors()
    try:
        yield
    except Exception as exc:
        cause = settings.expected_cause(exc)
        if cause is None:
            raise
        from medflow.runs import current_progress

        stage = current_progress().get("stage")
        err.print(f"[bold red]{'stage ' + stage + ': ' if stage else ''}{type(cause).__name__}:[/] "
                  f"{settings.describe(cause).removeprefix(type(cause).__name__ + ': ')}"
                  + (f" (details: {log_file}; -v prints them here)" if log_file else ""),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _print_result(result: dict, t0: float, cohort_s: float = 0.0) -> None:
    """The test line, the time per stage, and the rest of the wall time: start-up, Prefect's server
    and flow runs, Dask's clusters (``cohort_s``: time spent making a demo's cohort, shown apart)."""
    from medflow import kinds

    console.print()
    console.print(f"[bold]Test[/]: {kinds.get(result['task']).result_line(result['evaluation'])}")
    total = time.perf_counter() - t0
    stages = " · ".join(f"{k} {v:.1f}s" for k, v in result["stage_seconds"].items())
    cohort = f"cohort {cohort_s:.1f}s · " if cohort_s else ""
    outside = total - cohort_s - sum(result["stage_seconds"].values())
    console.print(f"Stages: {cohort}{stages} · outside the stages {outside:.1f}s · total {total:.1f}s")
    console.print(f"Run folder: {result['run_dir']}")
    from medflow.report_server import answering, url_for

    # the served URL when a report server answers (a browser opens it from the Prefect UI too), else the file
    console.print(f"[bold green]Report:[/] {url_for(result['report']) if answering() else result['report']}")


SUPERVISED_ENV = "MEDFLOW_SUPERVISED"
VERBOSE_ENV = "MEDFLOW_VERBOSE"


@app.command()
def run(spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Pipeline spec (YAML).")],
        verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Print the tracebacks of a failure that has "
                                              "a clear cause (a full disk, a bad label file); they always go to "
                                              "the log file beside the runs folder.")] = False) -> None:
    """Run the whole lifecycle for SPEC now.

    The pipeline runs in a child process that this command watches: should a native library
    crash it (a signal, not an exception), you get one line naming the signal and the stage, the
    Prefect flow run is marked Crashed, and the run folder stays resumable.
    """
    import os

    if os.environ.get(SUPERVISED_ENV):
        t0 = time.perf_counter()
        _print_result(_run_pipeline(spec), t0)
        return
    console.print(f"medflow run {spec}: checking the spec, its source and labels", highlight=False)
    _load_checked(spec)  # a bad spec fails here, before a second process starts
    console.print("starting: Prefect's server, TensorFlow and the Dask workers take some seconds before the first "
                  "stage", highlight=False)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    raise typer.Exit(_supervise(["run", str(spec)], spec))


def _supervise(args: list[str], spec_path: Path) -> int:
    """Run ``medflow <args>`` in a child process with its output passed through; return its exit status.
    A death by a signal ends in one line (signal, stage, where) instead of a fault dump, and a Crashed
    state for the pipeline's flow run."""
    import os
    import subprocess
    import tempfile

    from medflow.isolation import crash_site, signal_name
    from medflow.runs import PROGRESS_ENV

    with tempfile.TemporaryDirectory(prefix="medflow-run-") as tmp:
        progress, fault = Path(tmp) / "progress.json", Path(tmp) / "fault.txt"
        env = {**os.environ, SUPERVISED_ENV: str(fault), PROGRESS_ENV: str(progress)}
        cmd = [sys.executable, "-m", "medflow.cli", *args]
        try:
            if console.is_terminal and not os.environ.get("MEDFLOW_PLAIN"):
                from medflow.terminal import run_with_display

                code = run_with_display(cmd, env, progress, console,
                                        keep=lambda line: bool(os.environ.get(VERBOSE_ENV)) or not _banner(line))
            else:
                code = subprocess.call(cmd, env=env)
        except KeyboardInterrupt:
            return 130
        if code >= 0:
            return code
        sig = signal_name(code)
        known = json.loads(progress.read_text()) if progress.exists() else {}
        where = crash_site(fault.read_text(errors="replace")) if fault.exists() else None
    stage = known.get("stage", "start-up")
    message = (f"the pipeline process died of {sig} in stage {stage}" + (f" at {where}" if where else "")
               + " (a native crash, not a Python error)")
    run_dir = known.get("run_dir")
    err.print(f"[bold red]medflow run:[/] {message}; "
              + (f"the run folder {run_dir} keeps every finished stage: run the same command again to resume; "
                 if run_dir else "")
              + "`medflow doctor` shows this machine's CPU, oneDNN and GPUs", highlight=False, soft_wrap=True)
    if known.get("flow_run_id"):
        _mark_crashed(known["flow_run_id"], message, Path(spec_path))
    return 128 + (-code)


# native start-up lines of TensorFlow's libraries (abseil logs before its logging is set up)
BANNER_MARKS = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")


def _banner(line: str) -> bool:
    return any(mark in line for mark in BANNER_MARKS)


def _mark_crashed(flow_run_id: str, message: str, spec_path: Path) -> None:
    """Set the dead pipeline's flow run to Crashed with ``message`` (the UI shows why it ended)."""
    from medflow.spec import load_spec

    try:
        settings.configure(Path(load_spec(spec_path).runs_dir).parent)
        from prefect import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    except Exception as exc:  # noqa: BLE001 - the line above already told the user what happened
        err.print(f"(could not mark flow run {flow_run_id} Crashed: {type(exc).__name__}: {exc})")


@app.command()
def ingest(spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Pipeline spec (YAML); its data and ingest sections are used.")]) -> None:
    """Ingest SPEC's source into its store, alone: new and changed series only, de-identified."""
    from collections import Counter

    from medflow.errors import SpecError
    from medflow.preflight import store_problems
    from medflow.spec import load_spec

    try:
        s = load_spec(spec, ingest_only=True)  # ingest needs no labels: they are joined at the run's split
    except SpecError as exc:
        _fail_spec(exc)
    if store_problems(s):
        _fail_spec(SpecError(f"{spec}: cannot ingest now", store_problems(s)))
    settings.configure(Path(s.runs_dir).parent)
    from medflow import api_server

    t0 = time.perf_counter()
    api_server.start_early()
    from flows.ingest import ingest_flow
    from storage.store import Store

    api_server.wait()
    try:
        with _expected_errors():
            result = ingest_flow(s)
    finally:
        api_server.stop()
    rows = Store(s.data.store).quarantine()
    console.print(f"[bold]Ingest[/] of {result.get('files', '?')} files in {time.perf_counter() - t0:.1f} s: "
                  f"{result.get('ingested', 0)} series ingested, {result.get('unchanged', 0)} unchanged, "
                  f"{result.get('quarantined_series', 0)} quarantined; {len(rows)} file(s) in quarantine")
    for reason, n in Counter(_reason_kind(r["reason"]) for r in rows).most_common(12):
        console.print(f"  {n:6d}  {reason}")
    if result.get("quarantine_paths"):
        console.print(f"Quarantined files with their paths (identifying: keep it private): {result['quarantine_paths']}")


def _reason_kind(reason: str) -> str:
    """A quarantine reason without its per-file details, to count files by reason."""
    import re

    return re.sub(r"\d+", "N", reason.split(" (")[0].split(": ")[0])[:100]


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="A runs folder (e.g. work/demo/runs), or a spec whose runs to list.")],
) -> None:
    """List the runs in FOLDER, newest first: spec name, state, finish time, data digest, test metric."""
    from medflow.compare import list_runs

    if folder.is_file():
        from medflow.spec import load_spec

        folder = Path(load_spec(folder).runs_dir)
    if not folder.is_dir():
        err.print(f"[bold red]{folder} is not a folder of runs[/] (a spec's data.runs, by default runs/ beside its store)")
        raise typer.Exit(2)
    df = list_runs(folder)
    if df.empty:
        console.print(f"no runs in {folder}")
        return
    for r in df.itertuples():
        value = "" if pd_isna(r.value) else f"{r.metric} {r.value:.3f}"
        base = "" if pd_isna(r.baseline) else f" (baseline {r.baseline:.3f})"
        console.print(f"{r.run}  {r.spec:20} {r.state:9} {r.finished:19}  data {r.data:12}  {value}{base}",
                      soft_wrap=True)


def pd_isna(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(metavar="RUN_A", help="A finished run folder (classification, "
                                          "segmentation or detection).")],
    run_b: Annotated[Path, typer.Argument(metavar="RUN_B", help="Another, on the same store and split seed.")],
) -> None:
    """Test whether two runs differ on the test cases both scored: AUC (DeLong's paired test), macro AUC of
    multi-class runs (paired bootstrap over patients), Dice of segmentations (Wilcoxon's signed-rank test), CPM
    of 3D detection or AP50 and AP50:95 of 2D detection (paired bootstrap over patients)."""
    from medflow.compare import compare_runs

    try:
        r = compare_runs(run_a, run_b)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[bold red]cannot compare:[/] {exc}")
        raise typer.Exit(2) from None
    counts = f" ({r['n_positive']} positive, {r['n_negative']} negative)" if "n_positive" in r else ""
    console.print(f"shared test cases: {r['shared']}{counts}"
                  + (f"; only in A {r['only_a']}, only in B {r['only_b']}" if r["only_a"] or r["only_b"] else ""))
    metric = "AUC" if r["metric"] == "auc" else r["metric"]
    console.print(f"A {run_a.name}: {metric} {r['value_a']:.3f}")
    console.print(f"B {run_b.name}: {metric} {r['value_b']:.3f}")
    console.print(f"difference A − B: {r['difference']:+.3f} (95% CI {r['ci'][0]:+.3f} to {r['ci'][1]:+.3f})")
    console.print(f"{r['method']}: p = {r['p_value']:.3g}")
    for name, m in r.get("also", {}).items():  # detection2d: AP50:95 beside AP50
        console.print(f"{name.upper().replace('_', ':')}: A {m['value_a']:.3f}, B {m['value_b']:.3f}, difference "
                      f"{m['difference']:+.3f} (95% CI {m['ci'][0]:+.3f} to {m['ci'][1]:+.3f}), p = {m['p_value']:.3g}")


class ExportFormat(str, Enum):
    onnx = "onnx"
    savedmodel = "savedmodel"


@app.command()
def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A finished run folder (holds spec.yaml and model.keras).")],
    format: Annotated[ExportFormat, typer.Option(help="onnx (onnxruntime and most inference servers) or savedmodel "  # noqa: A002
                                                 "(TensorFlow Serving).")] = ExportFormat.onnx,
    output: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/export/FORMAT).")] = None,
) -> None:
    """Export a run's model as ONNX or a SavedModel, with contract.json: the input it expects (shape, the
    preprocessing steps), what it returns (classes, threshold). The export is checked against the Keras model."""
    settings.configure()
    settings.import_tensorflow_quietly()
    from medflow.exporting import export_run

    try:
        contract = export_run(run, format.value, output)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[bold red]cannot export:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"[bold green]Exported[/] {contract['path']} ({format.value}; input {contract['input']['shape']}, "
                  f"checked with {contract['checked']['runtime']}: max difference "
                  f"{contract['checked']['max_abs_difference']:.1e})")
    console.print(f"Contract: {Path(contract['folder']) / 'contract.json'}")


@app.command()
def validate(spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Pipeline spec (YAML).")]) -> None:
    """Check SPEC; print every problem with its field, value and what is allowed."""

    s = _load_checked(spec)
    console.print(f"[green]ok[/]: {s.name} ({len(s.preprocess)} preprocessing steps, model {s.model.arch}); "
                  "labels, store and prepared-array memory checked")


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="The facts as JSON (as runs record them).")] = False,
) -> None:
    """What this machine computes on: CPU and instruction sets, oneDNN, GPUs, TensorFlow/Keras and the backend.

    A model's numbers hold per CPU kind at most (TensorFlow picks its kernels by the CPU's
    instruction sets); every run records the same facts in training.json and provenance.json.
    """
    from medflow.hardware import describe, summary_lines

    info = describe()
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1) + "\n")
        return
    for line in summary_lines(info):
        console.print(line, highlight=False)


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option("--markdown", help="The spec reference table (as in the README).")] = False,
) -> None:
    """Print the spec's JSON Schema (or the reference table generated from it)."""
    if markdown:
        from medflow.reference import readme_block

        sys.stdout.write(readme_block() + "\n")
        return
    from medflow.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


def _synth(out: Path, patients: int, seed: int, matrix: int, **options):
    from rich.progress import Progress

    from medflow.synth import synthesize

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"synthesising {patients} patients", total=patients)
        cohort = synthesize(out, patients=patients, seed=seed, matrix=matrix,
                            progress=lambda done, total: progress.update(bar, completed=done), **options)
    console.print(f"wrote {cohort.n_files} files for {cohort.n_patients} patients "
                  f"({cohort.n_positive} with a nodule) to {cohort.dicom_dir}; labels in {cohort.labels_csv}")
    return cohort


def _synth_ecg(out: Path, n: int, seed: int):
    from rich.progress import Progress

    from medflow.synth_ecg import synthesize_ecg

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"synthesising {n} ECGs", total=n)
        cohort = synthesize_ecg(out, n=n, seed=seed, progress=lambda done, total: progress.update(bar, completed=done))
    console.print(f"wrote {cohort.n} 12-lead ECGs ({', '.join(f'{k} {v}' for k, v in sorted(cohort.classes.items()))}) "
                  f"to {cohort.dicom_dir}; labels in {cohort.labels_csv}")
    return cohort


def _synth_xray(out: Path, images: int, seed: int, fmt: str, classes: list[str] | None = None,
                marks: bool = False, split_folders: bool = False):
    from rich.progress import Progress

    from medflow.synth_xray import synthesize_xray

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"synthesising {images} chest X-rays", total=images)
        extra = {"classes": classes} if classes else {}
        cohort = synthesize_xray(out, images=images, seed=seed, fmt=fmt, **extra, marks=marks,
                                 split_folders=split_folders,
                                 progress=lambda done, total: progress.update(bar, completed=done))
    counts = ", ".join(f"{k} {v}" for k, v in cohort.counts.items())
    console.print(f"wrote {cohort.n_images} {fmt.upper()} chest X-rays ({counts}) to {cohort.images_dir}; labels in "
                  f"{cohort.labels_csv}" + (f"; {cohort.n_boxes} boxes in {cohort.boxes_csv}" if marks else ""))
    return cohort


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (the images and labels.csv are written there).")],
    kind: Annotated[SynthKind, typer.Option(help="ct: chest CT volumes with nodules; xray: chest radiographs, "
                                            "normal / pneumonia / effusion; ecg: 12-lead ECGs, normal / afib / bbb "
                                            "(DICOM waveforms).")] = SynthKind.ct,
    patients: Annotated[int, typer.Option(min=2, help="Number of patients (images for xray, ECGs for ecg).")] = 80,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    matrix: Annotated[int, typer.Option(min=32, help="CT: rows and columns of each slice.")] = 128,
    masks: Annotated[bool, typer.Option(help="CT: also write each nodule as a DICOM SEG.")] = False,
    marks: Annotated[bool, typer.Option(help="CT: also write each nodule's centre and diameter as a DICOM SR "
                                        "(TID 1500) and a row of marks.csv (LUNA16 layout), for detection; xray: "
                                        "each consolidation's box as a row of boxes.csv, for detection2d.")] = False,
    format: Annotated[ImageFormat, typer.Option(help="xray: dicom (DX/CR files) or png (8-bit PNG in one "  # noqa: A002
                                                "folder per class).")] = ImageFormat.dicom,
    classes: Annotated[str | None, typer.Option(help="xray: comma-separated subset of normal,pneumonia,effusion "
                                                "(default: all three).")] = None,
    split_folders: Annotated[bool, typer.Option(help="xray with --format png: train/, val/ and test/ folders of "
                                                "class folders (the Keras programs' layout; data.layout: "
                                                "folders).")] = False,
) -> None:
    """Write a synthetic cohort as real DICOM files (or PNG class folders), with labels.csv."""
    kind, format = kind.value, format.value  # noqa: A001
    if kind == "xray":
        if format not in ("dicom", "png"):
            err.print(f"[bold red]--format must be dicom or png[/] (received {format!r})")
            raise typer.Exit(2)
        try:
            _synth_xray(out, patients, seed, format, classes.split(",") if classes else None, marks=marks,
                        split_folders=split_folders)
        except ValueError as exc:
            err.print(f"[bold red]{exc}[/]")
            raise typer.Exit(2) from None
    elif kind == "ct":
        _synth(out, patients, seed, matrix, masks=masks, marks=marks)
    elif kind == "ecg":
        _synth_ecg(out, patients, seed)
    else:
        err.print(f"[bold red]--kind must be ct, xray or ecg[/] (received {kind!r})")
        raise typer.Exit(2)


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Work folder (cohort, store, runs, Prefect home); default "
                                                 "work/demo for classification, else work/demo-<task>.")] = None,
    patients: Annotated[int | None, typer.Option(min=10, help="Patients in the demo cohort (default: 150 for "
                                                 "classification and detection, 60 for segmentation, 600 images "
                                                 "for xray, 450 for detection2d, 450 ECGs for ecg).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the cohort, split and training.")] = 0,
    epochs: Annotated[int | None, typer.Option(min=1, help="Most training epochs (early stopping may end sooner); "
                                               "default 30, 40 for xray.")] = None,
    task: Annotated[DemoTask, typer.Option(help="classification (nodule present/absent on CT, cnn3d), "
                                           "segmentation (tumour masks from DICOM SEG, unet2d), detection (nodule "
                                           "centres from DICOM SR, centernet3d, FROC), xray (chest X-rays in three "
                                           "classes, resnet2d), detection2d (consolidation boxes on chest X-rays, "
                                           "centernet2d, COCO AP) or ecg (12-lead ECG rhythms, cnn_gru).")
                     ] = DemoTask.classification,
) -> None:
    """Synthesise a cohort, write a spec, and run the whole pipeline on it."""
    task = task.value
    if task not in DEMOS:
        err.print(f"[bold red]--task must be one of {', '.join(DEMOS)}[/] (received {task!r})")
        raise typer.Exit(2)
    t0 = time.perf_counter()
    template, default_size, default_dir, default_epochs = DEMOS[task]
    epochs = epochs or default_epochs
    patients = patients or default_size
    workdir = workdir or Path(default_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings.configure(workdir)  # the spec's runs folder is workdir/runs: the same Prefect home
    settings.import_tensorflow_quietly()  # its banner held back; before any thread or child process starts
    from medflow import api_server

    api_server.start_early()  # Prefect's server starts while the cohort is made
    marker = workdir / "cohort" / "cohort.json"
    if task == "xray":
        wanted = {"kind": "xray", "images": patients, "seed": seed}
    elif task == "detection2d":
        wanted = {"kind": "xray", "images": patients, "seed": seed, "marks": True}
    elif task == "ecg":
        wanted = {"kind": "ecg", "ecgs": patients, "seed": seed}
    else:
        # segmentation: lung tumours of 6-14 mm radius, in 3 of 4 patients, as DICOM SEG
        options = {"masks": True, "nodule_radius": [6.0, 14.0], "positive_fraction": 0.75} \
            if task == "segmentation" else {"nodule_radius": [5.0, 10.0]}
        if task == "detection":  # nodules as DICOM SR marks (and marks.csv) in 7 of 10 patients; tubular mimics
            options = {"marks": True, "mimics": True, "nodule_radius": [5.0, 10.0], "positive_fraction": 0.7}
        # "anatomy": the generator's version (vessels, granulomas, ground-glass nodules, blur since 2)
        wanted = {"patients": patients, "seed": seed, "matrix": 128, "anatomy": 6, **options}
    t_cohort = time.perf_counter()
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        console.print(f"using the cohort in {marker.parent}")
    else:
        if task == "xray":
            _synth_xray(workdir / "cohort", patients, seed, "dicom")
        elif task == "detection2d":
            _synth_xray(workdir / "cohort", patients, seed, "dicom", marks=True)
        elif task == "ecg":
            _synth_ecg(workdir / "cohort", patients, seed)
        else:
            _synth(workdir / "cohort", patients, seed, 128, **options)
        marker.write_text(json.dumps(wanted))
    spec_path = workdir / "demo.yaml"
    spec_path.write_text(template.format(seed=seed, epochs=epochs))
    console.print(f"spec: {spec_path}")
    cohort_s = time.perf_counter() - t_cohort
    _print_result(_run_pipeline(spec_path), t0, cohort_s)


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="A finished run folder (holds spec.yaml and model.keras).")],
    input: Annotated[Path, typer.Option(help="Folder of new DICOM studies, or a spec whose data.source to read.")],  # noqa: A002
    output: Annotated[Path, typer.Option(help="Output folder: a DICOM SEG per series (segmentation), a DICOM SR "
                                         "and detections.csv (detection, detection2d) or scores, with "
                                         "predictions.csv and predictions.json.")],
) -> None:
    """Apply a trained run to new DICOM studies: a DICOM SEG, a DICOM SR of detections, or scores, per series."""
    run_dir = model.expanduser().resolve()
    if not (run_dir / "model.keras").exists():
        err.print(f"[bold red]{run_dir} is not a finished medflow run[/] (no model.keras); pass the run folder "
                  "that `medflow run` printed")
        raise typer.Exit(2)
    if not (input.is_dir() or (input.is_file() and input.suffix in (".yaml", ".yml"))):
        err.print(f"[bold red]--input {input} is neither a folder of DICOM files or images nor a spec file[/]")
        raise typer.Exit(2)
    import os

    # Prefect's and Dask's own files go to medflow's cache, never beside the model: a shared or read-only run
    # folder must do for predict
    settings.configure(Path(os.environ.get("MEDFLOW_CACHE") or Path.home() / ".cache" / "medflow") / "predict")
    settings.import_tensorflow_quietly()
    from medflow import api_server

    t0 = time.perf_counter()
    api_server.start_early()
    from flows.predict import predict_flow

    api_server.wait()
    try:
        result = predict_flow(str(run_dir), str(input), str(output))
    finally:
        api_server.stop()
    console.print(f"[bold]Predicted[/] {result['series']} series with run {result['run_id']} in "
                  f"{time.perf_counter() - t0:.1f}s; {result['not_used']} file(s) not used")
    console.print(f"[bold green]Output:[/] {result['output']} (predictions.csv, predictions.json)")
    if not result["series"]:
        from collections import Counter

        not_used = json.loads((Path(result["output"]) / "predictions.json").read_text())["not_used"]
        reasons = Counter(r["reason"] for r in not_used).most_common(3)
        err.print("[bold red]Nothing was predicted:[/] " + ("; ".join(f"{n} file(s): {why}" for why, n in reasons)
                                                           or f"{input} holds no file")
                  + " (every file and its reason are in predictions.json)", highlight=False)
        raise typer.Exit(1)
    metrics = run_dir / "metrics.json"
    for warning in json.loads(metrics.read_text()).get("warnings", []) if metrics.exists() else []:
        err.print(f"[bold yellow]Warning about this model:[/] {warning}")


@app.command()
def server(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 4200,
    home: Annotated[Path, typer.Option(help="PREFECT_HOME: where the server keeps its database.")] = Path("work/.prefect"),
    reports_port: Annotated[int, typer.Option(help="Port on 127.0.0.1 of the read-only report server (0: none).")] = 4201,
    reports_root: Annotated[list[Path] | None, typer.Option(
        help="A folder whose run reports are served (repeat for more). Default: this folder.")] = None,
) -> None:
    """Start a standing Prefect server (UI and API) on 127.0.0.1 with medflow's settings, and the
    read-only report server that the UI's report links open.

    The API asks for credentials (Prefect's basic auth string, made once and kept in
    HOME/api-auth) and answers cross-origin requests only from its own UI: any web page the
    user visits could otherwise start runs on it. Clients read HOME/client.env.
    """
    import os
    import signal
    import subprocess

    from medflow import report_server

    settings.make_private(home)  # its database holds every run's spec, paths and logs
    for existing in home.glob("prefect.db*"):  # made by an earlier version with the umask's mode
        existing.chmod(0o600)
    os.umask(0o077)  # and what the server writes there (prefect.db, logs) is the owner's only
    auth = api_auth_string(home)
    url = f"http://127.0.0.1:{port}"
    client_env = home.resolve() / "client.env"
    reports = f"http://127.0.0.1:{reports_port}"
    if reports_port:
        try:
            report_server.start(reports_port, roots=reports_root)
        except OSError as exc:  # the port is taken: the UI and API still start, report links stay files
            err.print(f"[yellow]no report server on {reports}: {exc.strerror}[/] (choose another --reports-port)")
            reports_port = 0
    write_private(client_env, f"export PREFECT_API_URL={url}/api\nexport PREFECT_API_AUTH_STRING='{auth}'\n"
                  + (f"export MEDFLOW_REPORTS_URL={reports}\n" if reports_port else ""))
    env = {**os.environ, "PREFECT_HOME": str(home.resolve()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_UI_API_URL": f"{url}/api",
           "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": url}
    env.pop("PREFECT_API_URL", None)
    console.print(f"Prefect UI: {url} (its login asks for the auth string in {home / 'api-auth'})")
    console.print(f"For runs, deployments and the prefect CLI: source {client_env}")
    prefect = Path(sys.executable).with_name("prefect")
    if not reports_port:
        os.execve(str(prefect), [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
    console.print(f"Reports: {reports} (read-only; the report links of runs whose clients sourced client.env)")
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env)

    def stop(signum, frame):  # a stop for this process stops the Prefect server too: no orphaned server
        proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    raise typer.Exit(code)


@app.command()
def reports(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 4201,
    root: Annotated[list[Path] | None, typer.Option(
        help="A folder whose run reports are served (repeat for more). Default: this folder.")] = None,
) -> None:
    """Serve run reports read-only on 127.0.0.1 (what `medflow server` also does), so that the report links
    in the Prefect UI open; runs link here when MEDFLOW_REPORTS_URL points here (default port 4201).
    Only run folders under the roots, owned by this user, without symbolic links below the root."""
    import time

    from medflow import report_server

    server = report_server.start(port, roots=root)
    console.print(f"Reports: http://127.0.0.1:{port} (read-only) from {', '.join(map(str, server.roots))}. "
                  "Ctrl-C stops.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def api_auth_string(home: Path) -> str:
    """The server's ``user:password`` auth string: PREFECT_SERVER_API_AUTH_STRING if set, else the one
    kept in HOME/api-auth (made on first use, readable by its owner only)."""
    import os
    import secrets

    given = os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    if given:
        return given
    path = home / "api-auth"
    if not path.exists():
        write_private(path, f"medflow:{secrets.token_urlsafe(24)}")
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (credentials)."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


@app.command()
def serve(
    spec: Annotated[Path | None, typer.Option(help="Spec for every deployment (default: each deployment's own).")] = None,
    file: Annotated[Path, typer.Option(help="Deployments file.")] = Path("deployments/prefect.yaml"),
    allow: Annotated[list[Path] | None, typer.Option(
        help="A folder that runs started through the API may use (specs, their data, predict input and output); "
        "repeat for more. Default: this folder and the folders of the deployments' specs.")] = None,
    allow_url: Annotated[list[str] | None, typer.Option(
        help="A URL prefix that runs started through the API may reach: a DICOMweb server "
        "(dicomweb://pacs:8042/dicom-web) or an object store (s3://bucket/medflow); repeat for more. Default: the "
        "URLs the deployments' specs name; nothing else.")] = None,
) -> None:
    """Serve the deployments of deployments/prefect.yaml from this process, on their schedules.

    Needs a standing server (`medflow server`) and PREFECT_API_URL pointing at it (source the
    server's client.env), so that `prefect deployment run 'pipeline/adhoc' --param spec=...`
    from anywhere reaches it. Runs it starts may only use the allowed folders (--allow).
    """
    import os

    from medflow.access import ENV as ALLOWED_ENV
    from medflow.access import URLS_ENV as ALLOWED_URLS_ENV
    from medflow.errors import SpecError

    if not os.environ.get("PREFECT_API_URL"):
        err.print("[bold red]PREFECT_API_URL is not set.[/] Start a server with `medflow server` and "
                  "source the client.env it names (work/.prefect/client.env by default)")
        raise typer.Exit(2)
    settings.configure(None)
    from medflow.deploy import DEFAULT_FILE, read_deployments, to_runner_deployments

    deployments_file = file if file.exists() else DEFAULT_FILE
    try:
        defs = read_deployments(deployments_file, spec=spec)
    except SpecError as exc:
        _fail_spec(exc)
    roots = [Path.cwd(), *(allow or []), *(Path(d.spec).parent for d in defs if d.spec)]
    os.environ[ALLOWED_ENV] = os.pathsep.join(dict.fromkeys(str(r.expanduser().resolve()) for r in roots))
    urls = [*(allow_url or []), *_spec_urls(defs)]
    bad = [u for u in urls if "://" not in u or u.startswith("file://")]
    if bad:
        err.print(f"[bold red]--allow-url {bad[0]!r}[/]: expected a URL prefix such as dicomweb://host:port/path or "
                  "s3://bucket/prefix (folders go in --allow)")
        raise typer.Exit(2)
    os.environ[ALLOWED_URLS_ENV] = " ".join(dict.fromkeys(urls))
    console.print(f"runs through the API may use: {', '.join(os.environ[ALLOWED_ENV].split(os.pathsep))}")
    console.print(f"and reach: {', '.join(dict.fromkeys(urls)) or 'no URL (add with --allow-url)'}")
    try:
        with _expected_errors():  # again, now that the folders are restricted: a spec's data outside is refused
            defs = read_deployments(deployments_file, spec=spec)
    except SpecError as exc:
        _fail_spec(exc)
    for d in defs:
        when = f"cron {d.cron!r} ({d.timezone})" if d.cron else "on demand"
        console.print(f"serving {d.full_name}: {when}, spec {d.spec}")
    from prefect import serve as prefect_serve

    prefect_serve(*to_runner_deployments(defs))


def _spec_urls(defs) -> list[str]:
    """The URLs (DICOMweb sources, object stores) that the deployments' own specs name."""
    from medflow.spec import load_spec

    urls = []
    for d in defs:
        if d.spec:
            s = load_spec(d.spec, check_paths=False)
            urls += [u for u in (s.data.source, s.data.store) if "://" in u and not u.startswith("file://")]
    return urls


@app.command()
def worker(
    pool: Annotated[str, typer.Option(help="Work pool to take flow runs from (created, of the process type, if "
                                            "missing).")] = "medflow",
    train_slots: Annotated[int | None, typer.Option(
        help="Set the fleet-wide limit of trainings running at once (Prefect's concurrency limit on the "
             "medflow-train tag): 1 on a one-GPU machine. Leave it out to keep the limit as it is.")] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs this worker runs at once.")] = None,
) -> None:
    """Start a Prefect worker (process type) that runs the deployments of POOL on this machine.

    One machine per role: e.g. `medflow worker --pool cpu` beside the Dask cluster for ingest and
    preprocessing, `medflow worker --pool gpu --train-slots 1` on the GPU machine. Needs
    PREFECT_API_URL (source the client.env of `medflow server`).
    """
    import os

    if not os.environ.get("PREFECT_API_URL"):
        err.print("[bold red]PREFECT_API_URL is not set.[/] Start a server with `medflow server` and source the "
                  "client.env it names")
        raise typer.Exit(2)
    if train_slots is not None and train_slots < 1:
        err.print(f"[bold red]--train-slots[/]: expected a positive number of trainings at once; received {train_slots}")
        raise typer.Exit(2)
    settings.configure(None)
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from tasks.train import TRAIN_TAG

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            console.print(f"work pool {pool!r} created (process)")
        except ObjectAlreadyExists:
            pass
        if train_slots is not None:
            client.create_concurrency_limit(tag=TRAIN_TAG, concurrency_limit=train_slots)
            console.print(f"at most {train_slots} training(s) at once across all workers (tag {TRAIN_TAG!r})")
    prefect = Path(sys.executable).with_name("prefect")
    args = [str(prefect), "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        args += ["--limit", str(limit)]
    os.execv(str(prefect), args)


def command():
    """The click command of ``app`` with named placeholders in its help: ``--port PORT`` rather than Typer's
    ``<int>``, nothing after a flag (``--help``, ``--masks``), the choices of an Enum option as they are."""
    import typer.main
    from typer.core import TyperOption

    root = typer.main.get_command(app)
    context = type(root.context_class(root))  # Typer's own click (it vendors one)
    for cmd in [root, *getattr(root, "commands", {}).values()]:
        for param in cmd.get_params(context(cmd, info_name=cmd.name)):
            choice = getattr(getattr(param, "type_descriptor", None), "is_choice", False)
            if isinstance(param, TyperOption) and param.metavar is None and not choice:
                param.metavar = "" if param.is_flag else param.name.upper()
    return root


def main() -> None:
    import os

    fault = os.environ.get(SUPERVISED_ENV)
    if fault:  # a supervised pipeline: a native crash's dump goes to the supervisor's file
        import faulthandler

        faulthandler.enable(file=open(fault, "w"), all_threads=False)  # noqa: SIM115 - open until exit
    try:
        command()()
    finally:
        # The interpreter's last garbage collection walks every object TensorFlow, Prefect and Dask
        # made: seconds of a short run, after the work is done. Frozen objects are skipped by it;
        # exit handlers (Dask's, Prefect's) still run.
        gc.freeze()


if __name__ == "__main__":
    main()
