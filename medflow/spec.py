"""The pipeline spec: one YAML file, validated by pydantic before any work starts.

The models nest like the stages of the lifecycle (``PipelineSpec`` → ``DataSpec``,
``IngestSpec``, preprocessing steps, ``ModelSpec``, ``TrainSpec``, ``EvaluateSpec``,
``RunSpec``, ``ScheduleSpec``). Every model forbids unknown keys, so a typo fails with the
field's path. Relative paths in a spec file are resolved against the file's folder.
"""

from __future__ import annotations

import hashlib
import math
import os
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medflow.errors import SpecError

LABEL_KEYS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "path")
MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; anything larger is not one
MAX_STRING = 4096  # a path or a column name; longer is not one (and costs every reader of an error message)
MAX_NAME = 100  # the pipeline name: a folder, a Prefect flow-run and deployment name
MAX_DEPTH = 12  # the deepest spec nests 5 levels; a deeper document is not a spec
MAX_PARAM_INT = 65_536  # a layer width or count in model.params; larger exhausts any machine
# what data.store may be: a folder, or a URL of one of fsspec's file systems medflow supports
STORE_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "abfss", "memory")


def at_most(limit: float, why: str) -> AfterValidator:
    """An upper bound that says why it is there (a value past it is a typo, or exhausts the machine)."""

    def check(value):
        if value is not None and value > limit:
            raise ValueError(f"must be at most {limit:,} ({why})")
        return value

    return AfterValidator(check)


def at_least(limit: float, why: str) -> AfterValidator:
    def check(value):
        if value is not None and value < limit:
            raise ValueError(f"must be at least {limit:,} ({why})")
        return value

    return AfterValidator(check)


# bounds shared by several fields
MAX_EPOCHS = at_most(10_000, "early stopping ends real runs long before; more is a typo")
MAX_DIM = at_most(4096, "one axis of a prepared array; larger arrays do not fit a worker")
MAX_VOXELS = 2**30  # 4 GiB as float32: one prepared array must fit in a worker's memory


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_STRING)


# --------------------------------------------------------------------------- data
class LabelsSpec(_Model):
    """A CSV of labels: one row per study, patient or accession (DICOM), or per image file (images)."""

    path: str = Field(description="CSV file with a key column and a label column.")
    key: Literal["StudyInstanceUID", "PatientID", "AccessionNumber", "path"] = Field(
        "StudyInstanceUID", description="What the CSV's key column holds: a DICOM attribute, or `path`: image files "
        "relative to data.source (with data.format: images; the CSV then lists the images to ingest).")
    key_column: str | None = Field(None, description="Name of the key column (default: the value of `key`).")
    label_column: str = Field("label", description="Name of the label column: class names or numbers (0/1 for "
                              "binary; any K distinct values for K classes).")
    classes: list[str] | None = Field(None, min_length=2, description="The classes in order (default: sorted, as "
                                      "Keras' flow_from_directory). With two, the second is the positive class.")

    @property
    def key_column_name(self) -> str:
        return self.key_column or self.key


class SplitSpec(_Model):
    """Patient-level train/validation/test split."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_STRING, populate_by_name=True)

    from_: Literal["random", "layout", "column"] = Field(
        "random", alias="from", description="Where the split comes from: `random` (by patient, with `val`, `test`, "
        "`stratify`, `seed`), `layout` (the train/val/test folders of `data.layout: folders`), or `column` (a "
        "column of the labels CSV, named by `column`, holding train, val or test per row). A predefined split "
        "without validation cases takes `val` of the training patients for it; the report says where the split "
        "came from.")
    column: str = Field("split", description="With `from: column`: the labels CSV's column of splits.")
    val: float = Field(0.15, gt=0, lt=1, description="Fraction of patients for validation.")
    test: float = Field(0.15, gt=0, lt=1, description="Fraction of patients for testing.")
    by: Literal["patient"] = Field("patient", description="Grouping unit: no patient is in two splits.")
    stratify: bool = Field(True, description="Keep the label balance in every split.")
    seed: int = Field(0, description="Seed of the split.")
    folds: Annotated[int, at_most(20, "each fold trains a model; past 10 folds the estimates change little")] | None = Field(
        None, ge=2, description="k-fold cross-validation: the patients outside the test split go into K patient-grouped, "
        "stratified folds; fold k trains on the others and validates on it (each a Prefect task); the test split is "
        "scored by the ensemble of the K models (mean probability), and `medflow predict` uses it. null: one model "
        "with the `val` split.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.from_ != "random":
            return self
        if self.val + self.test >= 0.9:
            raise ValueError(
                f"split.val + split.test must leave at least 10% for training; received val={self.val}, test={self.test}"
            )
        return self


class MasksSpec(_Model):
    """Where segmentation masks come from; each is mapped onto its series' voxel grid at ingest."""

    source: Literal["seg", "nifti"] = Field(
        description="`seg`: DICOM SEG objects among the DICOM files, matched to their series by the referenced "
        "SeriesInstanceUID; `nifti`: NIfTI label files listed in `table`.")
    table: str | None = Field(None, description="CSV of NIfTI masks (for `source: nifti`): a key column and a path "
                              "column (relative paths are taken from the CSV's folder).")
    key: Literal["SeriesInstanceUID", "StudyInstanceUID"] = Field(
        "SeriesInstanceUID", description="The DICOM attribute the table's key column holds.")
    key_column: str | None = Field(None, description="Name of the table's key column (default: the value of `key`).")
    path_column: str = Field("mask", description="Name of the table's path column.")
    missing: Literal["empty", "skip"] = Field(
        "skip", description="Series without a mask: `skip` leaves them out of training and evaluation; `empty` "
        "takes them as having no foreground (e.g. scans without a lesion).")

    @property
    def key_column_name(self) -> str:
        return self.key_column or self.key

    @model_validator(mode="after")
    def _table(self) -> MasksSpec:
        if self.source == "nifti" and not self.table:
            raise ValueError("data.masks.table is required with source: nifti (a CSV of series keys and NIfTI paths)")
        return self


class MarksSpec(_Model):
    """Where lesion marks (centre and diameter, for detection) come from; placed on their series' voxel grid at
    ingest and stored with the series."""

    source: Literal["sr", "csv"] = Field(
        description="`sr`: DICOM SR measurement reports (TID 1500: 3D coordinates, or 2D regions on an image) among "
        "the DICOM files, matched to the series they reference; `csv`: a table in LUNA16's layout (seriesuid, "
        "coordX, coordY, coordZ in patient mm, diameter_mm), or of boxes on planar images (SOPInstanceUID, x0, y0, "
        "x1, y1 in pixels, the top left corner of the image at 0, 0).")
    table: str | None = Field(None, description="The CSV of marks (for `source: csv`); relative to the spec.")

    @model_validator(mode="after")
    def _table(self) -> MarksSpec:
        if self.source == "csv" and not self.table:
            raise ValueError("data.marks.table is required with source: csv (seriesuid, coordX, coordY, coordZ, "
                             "diameter_mm; or SOPInstanceUID, x0, y0, x1, y1)")
        return self


class DataSpec(_Model):
    source: str = Field(description="Folder of DICOM files (any layout, any file names), a DICOMweb server "
                        "(dicomweb://host:port/path, dicomweb+https://host/path), or with format: images a folder "
                        "of PNG/JPEG/BMP/TIFF images.")
    format: Literal["dicom", "images", "nifti", "nrrd", "mha", "volumes"] = Field(
        "dicom", description="`dicom`: DICOM files or a DICOMweb server; `images`: PNG, JPEG, BMP or single-page "
        "TIFF files; `nifti` (.nii, .nii.gz), `nrrd` (.nrrd, .nhdr), `mha` (.mha, .mhd) or `volumes` (any of "
        "the three, told by the suffix): volume files placed in LPS (NIfTI read with nibabel, NRRD and "
        "MetaImage with SimpleITK); image and volume files go in one subfolder per class (the "
        "flow_from_directory layout), or in train/, val/ and test/ folders of class folders (`layout: folders`), "
        "or are listed in data.labels with key: path.")
    layout: Literal["folders"] | None = Field(
        None, description="`folders`: image or volume files in `train/`, `val/` and `test/` folders (also "
        "`training`, `validation`, `testing`), each with one subfolder per class, as the Keras programs keep them; "
        "with `split.from: layout` their split is kept. null: one subfolder per class.")
    labels: LabelsSpec | None = Field(None, description="Labels for classification (images in class folders need "
                                      "none: the folder names are the classes).")
    masks: MasksSpec | None = Field(None, description="Masks for segmentation (DICOM SEG or NIfTI).")
    marks: MarksSpec | None = Field(None, description="Lesion marks for detection (DICOM SR or a CSV); a series "
                                    "without marks has no lesion.")
    store: str = Field(description="Zarr store: a folder, or an fsspec URL (s3://bucket/path, memory://name, "
                       "file:///path); created if missing.")
    runs: str | None = Field(None, description="Folder of run outputs (default: `runs` beside the store).")
    split: SplitSpec = SplitSpec()

    @model_validator(mode="after")
    def _split_source(self) -> DataSpec:
        problems = []
        if self.layout == "folders" and self.format == "dicom":
            problems.append("data.layout: folders holds image or volume files; set data.format (images, nifti, "
                            "nrrd, mha or volumes)")
        if self.layout == "folders" and self.labels is not None and self.labels.key == "path":
            problems.append("data.layout: folders takes the classes from the folder names; drop data.labels")
        if self.split.from_ == "layout" and self.layout != "folders":
            problems.append("data.split.from: layout needs data.layout: folders (train/, val/, test/ folders)")
        if self.split.from_ == "column" and self.labels is None:
            problems.append(f"data.split.from: column reads the column {self.split.column!r} of the labels CSV; "
                            "give data.labels")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, value: str) -> str:
        if "://" in value and value.split("://", 1)[0].lower() not in STORE_SCHEMES:
            raise ValueError(f"a store is a folder or a URL of one of: {', '.join(s + '://' for s in STORE_SCHEMES)}")
        return value

    @field_validator("source")
    @classmethod
    def _source_scheme(cls, value: str) -> str:
        from storage.dicomweb import is_dicomweb

        if "://" in value and not is_dicomweb(value):
            raise ValueError("a source is a folder or a DICOMweb server (dicomweb://host:port/path, "
                             "dicomweb+https://host/path)")
        return value


# ------------------------------------------------------------------------- ingest
class QCSpec(_Model):
    """What to do with a series whose geometry is not a clean, uniform stack."""

    mixed: Literal["quarantine", "split"] = Field(
        "quarantine", description="Several orientations or image sizes under one series UID: quarantine, or one volume per group.")
    duplicates: Literal["quarantine", "split", "accept"] = Field(
        "quarantine", description="Slices at the same position: quarantine; split into stacks (e.g. two acquisitions); "
        "or accept, keeping the first (by InstanceNumber).")
    spacing: Literal["quarantine", "accept"] = Field(
        "quarantine", description="Missing slices or non-uniform spacing: quarantine, or accept and resample "
        "linearly to the median spacing.")
    tilt: Literal["quarantine", "accept"] = Field(
        "quarantine", description="Positions not along the slice normal (gantry tilt): quarantine, or accept and "
        "shift each slice in-plane onto an orthogonal grid.")
    tilt_tolerance_deg: float = Field(0.5, ge=0, description="Largest tilt (degrees) taken as none.")


class IngestSpec(_Model):
    deidentify: bool = Field(
        True,
        description="Keep only pseudonymous keys and non-identifying attributes. "
        "Turning this off stores patient/study/series identifiers in the store.",
    )
    modalities: list[str] | None = Field(None, description="Modalities to ingest (e.g. [CT]); others are quarantined.")
    min_slices: Annotated[PositiveInt, at_most(100_000, "more slices than any series has")] = Field(1, description="Series with fewer slices are quarantined.")
    spacing_tolerance: float = Field(
        0.1, ge=0, description="Largest relative deviation of slice spacing from its median before a series is quarantined."
    )
    color: Literal["quarantine", "grayscale"] = Field(
        "quarantine", description="Colour (RGB/YBR) images: quarantine them, or convert them to grayscale luminance."
    )
    fallback_spacing: Annotated[PositiveFloat, at_most(100, "no image has pixels 10 cm wide")] | None = Field(
        None, description="Pixel spacing (mm) for planar images (X-rays, secondary captures) whose PixelSpacing or "
        "ImagerPixelSpacing is impossible (zero, negative, not a number); recorded in the catalog's "
        "spacing_source. Null: such images are quarantined. Volumes with an impossible geometry are always "
        "quarantined.")
    time_point: Annotated[int, at_most(100_000, "more volumes than any 4D file holds")] | None = Field(
        None, ge=0, description="Volume files with a 4th axis (time points, or the Decathlon's MR sequences): the "
        "index of the volume to take; null quarantines 4D files.")
    qc: QCSpec = QCSpec()


# --------------------------------------------------------------------- preprocess
Spacing = Annotated[PositiveFloat, at_least(0.01, "finer than any scanner; the resampled array would not fit"),
                    at_most(1000, "a voxel a metre wide holds no image")]
Dim = Annotated[PositiveInt, MAX_DIM]
Vec3 = tuple[Spacing, Spacing, Spacing]
Shape3 = tuple[Dim, Dim, Dim]


def _check_voxels(shape) -> None:
    n = 1
    for v in shape:
        n *= int(v)
    if n > MAX_VOXELS:
        raise ValueError(f"shape {list(shape)} has {n:,} voxels; at most {MAX_VOXELS:,} (4 GiB as float32: one "
                         "prepared array must fit in a worker's memory)")


class ResampleArgs(_Model):
    spacing: Vec3 = Field(description="Target spacing (z, y, x) in mm.")
    order: int = Field(1, ge=0, le=3, description="Spline order: 1 (linear, one axis at a time on threads) "
                                                   "or 0, 2, 3 (scipy.ndimage.zoom).")


class WindowArgs(_Model):
    center: float = Field(description="Window centre (HU).")
    width: PositiveFloat = Field(description="Window width (HU); output scaled to [0, 1].")


class ZScoreArgs(_Model):
    eps: PositiveFloat = Field(1e-6, description="Smallest standard deviation divided by.")


class ClipArgs(_Model):
    min: float = Field(description="Lower bound.")
    max: float = Field(description="Upper bound.")

    @model_validator(mode="after")
    def _order(self) -> ClipArgs:
        if self.min >= self.max:
            raise ValueError(f"clip.min must be below clip.max; received min={self.min}, max={self.max}")
        return self


class ResizeArgs(_Model):
    shape: Shape3 = Field(description="Output shape (z, y, x).")
    order: int = Field(1, ge=0, le=3, description="Spline order (0 = nearest, 1 = linear).")

    @model_validator(mode="after")
    def _fits(self) -> ResizeArgs:
        _check_voxels(self.shape)
        return self


class CropPadArgs(_Model):
    shape: Shape3 = Field(description="Output shape (z, y, x), centred crop or pad.")
    value: float | None = Field(None, description="Pad value (default: the image minimum).")

    @model_validator(mode="after")
    def _fits(self) -> CropPadArgs:
        _check_voxels(self.shape)
        return self


class LungMaskArgs(_Model):
    threshold: float = Field(-400.0, description="HU below which a voxel counts as air or lung.")
    fill: float = Field(-1000.0, description="Value outside the lung fields (HU).")
    dilate_mm: Annotated[float, at_most(1000, "wider than any body")] = Field(0.0, ge=0, description="Dilation of the lung mask in mm.")


class Resize2DArgs(_Model):
    shape: tuple[Annotated[PositiveInt, at_most(16384, "larger than any detector")],
                 Annotated[PositiveInt, at_most(16384, "larger than any detector")]] = Field(
        description="Output size (height, width) of each slice.")
    aspect: Literal["pad", "stretch"] = Field(
        "pad", description="`pad`: scale to fit, keeping the aspect ratio, and pad the rest with the image "
        "minimum; `stretch`: scale each axis to the size.")
    order: int = Field(1, ge=0, le=3, description="Spline order (0 = nearest, 1 = linear).")


class RescaleArgs(_Model):
    scale: float | None = Field(None, description="Multiply by this (e.g. 0.00392156862745098 = 1/255 for 8-bit "
                                "images, as Keras' rescale); null: min-max to [0, 1] per image.")
    offset: float = Field(0.0, description="Added after scaling.")


class EqualizeArgs(_Model):
    method: Literal["clahe", "histogram"] = Field(
        "clahe", description="`clahe`: contrast-limited adaptive histogram equalisation; `histogram`: global.")
    clip_limit: float = Field(0.01, gt=0, le=1, description="CLAHE clip limit (higher: more contrast).")
    kernel_size: Annotated[PositiveInt, MAX_DIM] | None = Field(None, description="CLAHE tile size in pixels (default: 1/8 of the image).")


class AxialSliceArgs(_Model):
    index: int | None = Field(None, description="The slice (negative: from the end); null: the middle one.")


class ResampleStep(_Model):
    resample: ResampleArgs


class AxialSliceStep(_Model):
    axial_slice: AxialSliceArgs = AxialSliceArgs()


class Resize2DStep(_Model):
    resize2d: Resize2DArgs


class RescaleStep(_Model):
    rescale: RescaleArgs = RescaleArgs()


class EqualizeStep(_Model):
    equalize: EqualizeArgs = EqualizeArgs()


class WindowStep(_Model):
    window: WindowArgs


class ZScoreStep(_Model):
    zscore: ZScoreArgs = ZScoreArgs()


class ClipStep(_Model):
    clip: ClipArgs


class ResizeStep(_Model):
    resize: ResizeArgs


class CropPadStep(_Model):
    crop_pad: CropPadArgs


class LungMaskStep(_Model):
    lung_mask: LungMaskArgs = LungMaskArgs()


# ---- waveform (ECG) steps: the signal is (1, samples, leads), y spacing = ms per sample
Hz = Annotated[PositiveFloat, at_most(100_000, "above any ECG or physiological sampling rate")]


class ResampleSignalArgs(_Model):
    rate: Hz = Field(description="Target sampling rate (Hz); polyphase, anti-aliased.")


class BandpassArgs(_Model):
    low: Hz | None = Field(0.5, description="Low cut-off (Hz); null: low-pass only.")
    high: Hz | None = Field(40.0, description="High cut-off (Hz); null: high-pass only.")
    order: Annotated[PositiveInt, at_most(10, "higher Butterworth orders are numerically unstable")] = Field(
        4, description="Butterworth order (zero phase: applied forward and backward).")


class NotchArgs(_Model):
    freq: list[Hz] = Field([50.0, 60.0], min_length=1, description="Mains frequencies to remove (Hz).")
    quality: PositiveFloat = Field(30.0, description="Notch quality factor (higher: narrower).")


class BaselineArgs(_Model):
    cutoff: Annotated[PositiveFloat, at_most(5, "above 5 Hz a high-pass removes the ECG's own waves")] = Field(
        0.5, description="High-pass cut-off (Hz) that removes baseline wander.")


class NormalizeLeadsArgs(_Model):
    eps: PositiveFloat = Field(1e-6, description="Added to each lead's standard deviation.")


class CropPadSignalArgs(_Model):
    seconds: Annotated[PositiveFloat, at_most(86_400, "a day of signal")] = Field(
        description="Fixed length: centred crop, or zero padding at both ends.")


class SelectLeadsArgs(_Model):
    leads: list[str] = Field(min_length=1, description="Leads to keep, in order (I, II, III, aVR, aVL, aVF, V1-V6).")


class ResampleSignalStep(_Model):
    resample_signal: ResampleSignalArgs


class BandpassStep(_Model):
    bandpass: BandpassArgs = BandpassArgs()


class NotchStep(_Model):
    notch: NotchArgs = NotchArgs()


class BaselineStep(_Model):
    baseline: BaselineArgs = BaselineArgs()


class NormalizeLeadsStep(_Model):
    normalize_leads: NormalizeLeadsArgs = NormalizeLeadsArgs()


class CropPadSignalStep(_Model):
    crop_pad_signal: CropPadSignalArgs


class SelectLeadsStep(_Model):
    select_leads: SelectLeadsArgs


SIGNAL_STEP_NAMES = ("resample_signal", "bandpass", "notch", "baseline", "normalize_leads", "crop_pad_signal",
                     "select_leads")
STEP_NAMES = ("resample", "lung_mask", "window", "zscore", "clip", "resize", "crop_pad", "resize2d", "rescale",
              "equalize", "axial_slice", *SIGNAL_STEP_NAMES)


def _step_name(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        name = next(iter(value))
        return name if name in STEP_NAMES else None
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


Step = Annotated[
    Union[
        Annotated[ResampleStep, Tag("resample")],
        Annotated[WindowStep, Tag("window")],
        Annotated[ZScoreStep, Tag("zscore")],
        Annotated[ClipStep, Tag("clip")],
        Annotated[ResizeStep, Tag("resize")],
        Annotated[CropPadStep, Tag("crop_pad")],
        Annotated[LungMaskStep, Tag("lung_mask")],
        Annotated[Resize2DStep, Tag("resize2d")],
        Annotated[RescaleStep, Tag("rescale")],
        Annotated[EqualizeStep, Tag("equalize")],
        Annotated[AxialSliceStep, Tag("axial_slice")],
        Annotated[ResampleSignalStep, Tag("resample_signal")],
        Annotated[BandpassStep, Tag("bandpass")],
        Annotated[NotchStep, Tag("notch")],
        Annotated[BaselineStep, Tag("baseline")],
        Annotated[NormalizeLeadsStep, Tag("normalize_leads")],
        Annotated[CropPadSignalStep, Tag("crop_pad_signal")],
        Annotated[SelectLeadsStep, Tag("select_leads")],
    ],
    Discriminator(
        _step_name,
        custom_error_type="invalid_step",
        custom_error_message="each preprocess step is a mapping with exactly one key, one of: " + ", ".join(STEP_NAMES),
    ),
]


def step_items(steps: list[Any]) -> list[tuple[str, dict]]:
    """``[("resample", {...}), ...]`` for a validated list of steps."""
    out = []
    for step in steps:
        name = _step_name(step)
        out.append((name, getattr(step, name).model_dump()))
    return out


# -------------------------------------------------------------------------- model
class AugmentSpec(_Model):
    flip: list[Literal["z", "y", "x"]] = Field(default_factory=list, description="Axes flipped at random.")
    shift: Annotated[int, at_most(1000, "a shift past the image leaves nothing of it")] = Field(0, ge=0, description="Largest random shift in voxels along y and x.")
    rotate_deg: float = Field(0.0, ge=0, le=180, description="Largest random in-plane rotation (degrees).")
    zoom: float = Field(0.0, ge=0, lt=1, description="Largest random in-plane zoom, as a fraction (0.1: 0.9-1.1x).")
    intensity_jitter: float = Field(0.0, ge=0, description="Scale and offset jitter of intensities, brightness "
                                    "(fraction).")
    contrast: float = Field(0.0, ge=0, lt=1, description="Largest random contrast change about the mean (fraction).")


class ModelSpec(_Model):
    task: str = Field(
        "classification", description="The task kind: what the model predicts and how it is evaluated (see "
        "medflow.kinds): classification (a class per series or image), segmentation (a mask, from data.masks), "
        "detection (lesion centres and sizes, from data.marks), detection2d (lesion boxes on planar images, from "
        "data.marks) or signal (a class per waveform: DICOM ECG).",
        json_schema_extra={"enum": ["classification", "detection", "detection2d", "segmentation", "signal"]})
    arch: str = Field("cnn3d", description="A model of the registry in models/: cnn3d (3D), seed_cnn, resnet2d, "
                      "efficientnet_b0 (2D) for classification; unet2d, unet3d for segmentation; centernet3d for detection; centernet2d for detection2d; gru, lstm, "
                      "cnn_gru for signal.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the model builder "
                                   "(e.g. filters, norm for the U-Nets).")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from medflow import kinds

        if value not in kinds.available():
            raise ValueError(f"unknown task kind {value!r}; expected one of: {', '.join(kinds.available())}")
        return value

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from models import available

        if value not in available():
            raise ValueError(f"unknown model arch {value!r}; expected one of: {', '.join(available())}")
        return value

    @model_validator(mode="after")
    def _arch_fits_task(self) -> ModelSpec:
        from models import available, info, params_of

        if info(self.arch).task != self.task:
            raise ValueError(f"model.arch {self.arch!r} is a {info(self.arch).task} model; for {self.task} use one "
                             f"of: {', '.join(available(self.task))}")
        accepted = params_of(self.arch)
        unknown = sorted(set(self.params) - accepted) if accepted is not None else []
        if unknown:
            import difflib

            hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
                k, sorted(accepted), n=1, cutoff=0.7)) else "") for k in unknown]
            raise ValueError(f"model.params: {', '.join(hints)} not a parameter of {self.arch}; it takes: "
                             f"{', '.join(sorted(accepted)) or 'none'}")
        too_big = [f"{k}={v!r}" for k, v in self.params.items() if not _sane_param(v)]
        if too_big:
            raise ValueError(f"model.params: {', '.join(too_big)}: numbers must be finite and at most "
                             f"{MAX_PARAM_INT:,} (a layer width or count)")
        return self


def _sane_param(value) -> bool:
    """A model.params value whose numbers (also inside lists) are finite and at most ``MAX_PARAM_INT``."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, str):
        return len(value) <= MAX_STRING
    if isinstance(value, (int, float)):
        return math.isfinite(value) and abs(value) <= MAX_PARAM_INT
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_sane_param(v) for v in value)
    if isinstance(value, dict):
        return len(value) <= 64 and all(_sane_param(v) for v in value.values())
    return False


class TrainSpec(_Model):
    epochs: Annotated[PositiveInt, MAX_EPOCHS] = Field(30, description="Most epochs to train (early stopping may end sooner).")
    batch_size: Annotated[PositiveInt, at_most(4096, "a batch must fit in memory with its activations")] = Field(8, description="Volumes per batch.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Keras optimizer.")
    learning_rate: PositiveFloat = Field(1e-3, description="Initial learning rate.")
    early_stopping: Annotated[PositiveInt, MAX_EPOCHS] | None = Field(8, description="Patience in epochs on validation loss; null turns it off.")
    reduce_lr: Annotated[PositiveInt, MAX_EPOCHS] | None = Field(4, description="Halve the learning rate after this many epochs without improvement.")
    val_smoothing: float = Field(
        0.5, ge=0.0, le=0.9, description="Early stopping, the learning-rate drops and the best checkpoint follow an "
        "exponential moving average of the validation loss (`val_loss_smooth` = s·previous + (1 − s)·val_loss), "
        "so that one noisy epoch neither stops training nor picks the model; 0 follows the raw validation loss.")
    min_epochs: Annotated[int, MAX_EPOCHS] = Field(
        0, ge=0, description="Epochs always trained before early stopping may end training.")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="`balanced` weights classes by inverse frequency (class imbalance).")
    seed: int = Field(0, description="Seed of weights, data order and augmentation.")
    mixed_precision: bool | Literal["float16", "bfloat16"] = Field(
        False, description="Mixed-precision compute, variables kept in float32: `true` takes float16 on a GPU and "
        "bfloat16 on a CPU with bfloat16 instructions (AVX512_BF16, AMX; `medflow doctor` tells), float32 where "
        "there is neither; or name the type.")
    jit_compile: bool = Field(False, description="Compile each training step with XLA (TensorFlow backend).")
    distribute: Literal["none", "mirrored", "multi_worker"] = Field(
        "none", description="`mirrored`: one replica per GPU (per logical CPU device without GPUs) on this machine, "
        "`batch_size` being the global batch, BatchNorm over the global batch (TensorFlow backend); `multi_worker`: "
        "`workers` processes train one model in lock-step (MultiWorkerMirroredStrategy, TF_CONFIG), started by the "
        "train stage on this machine's loopback (classification and signal kinds).")
    workers: Annotated[int, at_most(64, "each worker holds the model and the training arrays")] = Field(
        2, ge=2, description="With distribute: multi_worker, the number of worker processes.")
    deterministic: bool = Field(False, description="Deterministic ops (TensorFlow op determinism): the same spec "
                                "and data give the same model and predictions; somewhat slower.")
    patch_size: list[Annotated[PositiveInt, MAX_DIM]] | None = Field(
        None, min_length=2, max_length=3, description="Segmentation: training patch, (y, x) for unet2d or (z, y, x) "
        "for unet3d; null takes whole slices (unet2d) or whole volumes (unet3d).")
    foreground_ratio: float = Field(
        0.5, ge=0, le=1, description="Segmentation: fraction of patches centred on a foreground voxel (the rest at "
        "random), against the imbalance of small lesions.")
    fold_workers: Annotated[PositiveInt, at_most(64, "each fold worker trains a model in memory")] = Field(
        1, description="With data.split.folds: how many folds train at once (threads of the train flow's task "
        "runner; each model is a separate Keras model). 1 trains them one after another.")
    samples_per_volume: Annotated[PositiveInt, at_most(4096, "patches per volume per epoch; more only repeats them")] = Field(4, description="Segmentation: patches drawn from each volume per epoch.")


class EvaluateSpec(_Model):
    metrics: list[str] | None = Field(
        default=None, description="Metrics reported on the test split (with bootstrap intervals); default: all of "
        "the task kind's (auc, accuracy, precision, recall, specificity, f1 for classification, as macro averages "
        "with more than two classes; dice, iou, hd95, assd, volume_error for segmentation).")
    bootstrap: Annotated[int, at_most(100_000, "each resample scores the test split again; 10,000 already gives stable intervals")] = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals (0: none).")
    threshold: Literal["youden_median", "youden", "f1"] | float = Field(
        "youden_median", description="How the decision threshold is chosen on the validation split: "
        "`youden_median`, the median of Youden's threshold over 500 bootstrap resamples of the validation patients "
        "(a single maximum on a few patients is luck; the report gives the resampled range); `youden`, that single "
        "maximum; `f1`, the best F1; or a fixed value.")
    baselines: list[Literal["radiomics", "hog", "ecg_features"]] = Field(
        default_factory=list, description="Strong classical baselines scored beside the kind's simple one, each fitted "
        "outside the test split with its settings chosen by cross-validation grouped by patient, and compared with "
        "the model on the same test cases (paired difference and its interval): `radiomics` (images and volumes: "
        "first-order, GLCM texture and blob features, random forest), `hog` (2D images: HOG, logistic "
        "regression), `ecg_features` (waveforms: heart rate, RR irregularity, QRS width, P-wave energy, logistic "
        "regression).")
    calibrate: Literal["none", "platt", "temperature"] = Field(
        "none", description="Classification: recalibrate scores with a map fitted on the validation split (`platt`: "
        "logistic regression on the logit, two classes; `temperature`: one temperature on the logits, any number "
        "of classes). The report shows Brier score, ECE and a reliability diagram before and after; the threshold, "
        "the test metrics and `medflow predict` use the calibrated scores.")
    calibration_bins: Annotated[PositiveInt, at_most(100, "bins need cases")] = Field(
        10, ge=2, description="Equal-width bins of the expected calibration error and the reliability diagram.")


# ---------------------------------------------------------------------------- run
class DaskSpec(_Model):
    address: str | None = Field(None, description="Existing scheduler (tcp://host:8786); null starts a local cluster.")
    n_workers: Annotated[PositiveInt, at_most(512, "local workers are processes of one machine")] = Field(2, description="Worker processes of the local cluster.")
    threads_per_worker: Annotated[PositiveInt, at_most(512, "more threads than any machine has cores")] = Field(1, description="Threads per local worker.")
    start_method: Literal["forkserver", "spawn"] | None = Field(
        None, description="How local workers start; null: forkserver on Linux (workers forked from a server "
        "process that has imported medflow once: about 0.15 s per cluster), spawn elsewhere.")


class RunSpec(_Model):
    retries: Annotated[int, at_most(10, "retries are for passing faults; past a few the fault is not passing")] = Field(2, ge=0, description="Retries of I/O tasks.")
    dask: DaskSpec = DaskSpec()


class ScheduleSpec(_Model):
    cron: str = Field(description='Cron expression, e.g. "0 2 * * *".')
    timezone: str = Field("UTC", description="Time zone of the cron expression.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(value, datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from exc
        return value


class PipelineSpec(_Model):
    """A whole pipeline: data, ingest, preprocessing, model, training, evaluation, run settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_NAME,
                      description="Pipeline name (letters, digits, `-_.`; at most 100 characters).")
    data: DataSpec
    ingest: IngestSpec = IngestSpec()
    preprocess: list[Step] = Field(default_factory=list, description="Steps applied in order to every series.")
    augment: AugmentSpec = AugmentSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    run: RunSpec = RunSpec()
    schedule: ScheduleSpec | None = None

    @model_validator(mode="after")
    def _task_inputs(self, info: ValidationInfo) -> PipelineSpec:
        from medflow import kinds

        if (info.context or {}).get("ingest_only"):
            return self  # `medflow ingest` reads data and ingest only: labels and the model are for later
        problems = kinds.get(self.model.task).check_spec(self)
        if problems:
            raise ValueError("\n".join(problems))  # one ``field: problem`` per line (see format_errors)
        return self

    def metric_names(self) -> list[str]:
        """The metrics to report: the spec's, or every metric of the task kind."""
        from medflow import kinds

        return list(self.evaluate.metrics or kinds.get(self.model.task).metrics)

    @property
    def runs_dir(self) -> str:
        """Run folders: ``data.runs``, else ``runs`` beside a local store (a URL store gets one at parse)."""
        return self.data.runs or str(Path(self.data.store).parent / "runs")

    def digest(self) -> str:
        """sha256 of the canonical JSON of the spec."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def steps(self) -> list[tuple[str, dict]]:
        return step_items(self.preprocess)


# ------------------------------------------------------------------------ loading
def _loc(loc: tuple) -> str:
    # pydantic puts the union tag of a step before the step's own field: drop the tag
    parts = [p for i, p in enumerate(loc) if not (i + 1 < len(loc) and p in STEP_NAMES and loc[i + 1] == p)]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def format_errors(exc: ValidationError) -> list[str]:
    """One line per problem: ``field.path: what is wrong (received: value)``."""
    lines = []
    for err in exc.errors():
        loc = _loc(tuple(err["loc"]))
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) or len(str(value)) < 120 else "{...}"
        if len(shown) > 120:  # a 100,000-character value would fill the console (and take minutes to print)
            shown = f"{shown[:80]}... ({len(shown):,} characters)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + _suggest(str(err["loc"][-1]))
        if err["type"] == "invalid_step" and isinstance(value, dict) and len(value) == 1:
            import difflib

            close = difflib.get_close_matches(str(next(iter(value))), STEP_NAMES, n=1, cutoff=0.6)
            msg = f"unknown step {next(iter(value))!r}" + (f"; did you mean {close[0]!r}?" if close else "") + \
                f"; a step is one of: {', '.join(STEP_NAMES)}"
        if re.match(r"^[a-z_.]+: ", msg) and (not loc or msg.startswith(loc + ".")):
            # a model's own checks (a task kind's, the data section's), each line with its full field path
            lines.extend(msg.splitlines())
            continue
        lines.append(f"{loc or '<spec>'}: {msg} (received: {shown})")
    return lines


def _field_names() -> set[str]:
    names: set[str] = set()
    stack: list[type[BaseModel]] = [PipelineSpec]
    while stack:
        model = stack.pop()
        for name, info in model.model_fields.items():
            names.add(name)
            for arg in getattr(info.annotation, "__args__", ()) + (info.annotation,):
                if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in stack:
                    stack.append(arg)
    return names


def _suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(_field_names()), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_spec(data: Any, *, base_dir: str | Path = ".", check_paths: bool = True, ingest_only: bool = False
               ) -> PipelineSpec:
    """Validate a spec mapping; resolve relative paths against ``base_dir``. ``ingest_only``: the checks of
    what ingest reads (data, ingest), not the task kind's (labels, model, preprocessing).

    Raises:
        SpecError: listing every problem with its field path, the value and what is allowed.
    """
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a YAML mapping; received {type(data).__name__}")
    try:
        spec = PipelineSpec.model_validate(data, context={"ingest_only": ingest_only})
    except ValidationError as exc:
        problems = format_errors(exc)
        raise SpecError("invalid spec:\n  " + "\n  ".join(problems), problems) from exc
    base = Path(base_dir)
    labels = spec.data.labels
    data_spec = spec.data.model_copy(
        update={
            "source": _resolve(spec.data.source, base),
            "store": _resolve(spec.data.store, base),
            # runs are local files; beside a local store by default, else beside the spec
            "runs": _resolve(spec.data.runs or ("runs" if "://" in spec.data.store else None), base),
            "labels": labels.model_copy(update={"path": _resolve(labels.path, base)}) if labels else None,
            "masks": spec.data.masks.model_copy(update={"table": _resolve(spec.data.masks.table, base)})
            if spec.data.masks else None,
            "marks": spec.data.marks.model_copy(update={"table": _resolve(spec.data.marks.table, base)})
            if spec.data.marks else None,
        }
    )
    spec = spec.model_copy(update={"data": data_spec})
    if check_paths:
        problems = []
        from storage.dicomweb import is_dicomweb

        if not is_dicomweb(spec.data.source) and not Path(spec.data.source).is_dir():
            problems.append(f"data.source: folder not found (received: {spec.data.source!r})")
        if spec.data.labels and not Path(spec.data.labels.path).is_file():
            problems.append(f"data.labels.path: file not found (received: {spec.data.labels.path!r})")
        if spec.data.masks and spec.data.masks.table and not Path(spec.data.masks.table).is_file():
            problems.append(f"data.masks.table: file not found (received: {spec.data.masks.table!r})")
        if spec.data.marks and spec.data.marks.table and not Path(spec.data.marks.table).is_file():
            problems.append(f"data.marks.table: file not found (received: {spec.data.marks.table!r})")
        unwritable = _unwritable(spec.data.store)
        if unwritable:
            problems.append(f"data.store: {unwritable} (received: {spec.data.store!r})")
        if problems:
            raise SpecError("invalid spec:\n  " + "\n  ".join(problems), problems)
    return spec


def _unwritable(store: str) -> str | None:
    """Why a local store cannot be written (the store, or the nearest folder above it that exists), or None."""
    if "://" in store and not store.startswith("file://"):
        return None
    path = Path(store.removeprefix("file://")).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"{str(path)!r} is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"folder {str(path)!r} is not writable by this user (a read-only store cannot be ingested into)"
    return None


class _SpecLoader(yaml.SafeLoader):
    """YAML without aliases, without duplicate keys and at most ``MAX_DEPTH`` levels deep.

    ``*name`` can build a loop (``x: &a [*a]``) or a billion-element document from a kilobyte
    (nested aliases); a key given twice silently loses its first value; 50,000 nested levels
    exhaust the parser's recursion. A spec has no use for any of them."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not accepted in a "
                                              "spec; write the value out", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"the spec nests more than {MAX_DEPTH} levels deep; a "
                                              "spec is a few levels of mappings and lists", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; the second "
                                                        "value would silently replace the first", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """``data`` with dotted fields set (``{"train.epochs": 5, "data.split.seed": 3}``), as a deployment's UI form
    or ``prefect deployment run --param overrides=...`` gives them; validated with the rest of the spec.

    >>> apply_overrides({"train": {"epochs": 30}}, {"train.epochs": 5, "evaluate.bootstrap": 100})
    {'train': {'epochs': 5}, 'evaluate': {'bootstrap': 100}}
    """
    import copy

    out = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        parts = str(dotted).split(".")
        if not all(parts) or len(parts) > MAX_DEPTH:
            raise SpecError(f"override {dotted!r}: expected a dotted field such as train.epochs")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise SpecError(f"override {dotted!r}: {part!r} is not a section of the spec")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_spec(path: str | Path, *, check_paths: bool = True, overrides: dict[str, Any] | None = None,
              ingest_only: bool = False) -> PipelineSpec:
    """Read and validate a YAML spec file (with ``overrides``: dotted fields set first, see ``apply_overrides``).

    Under ``medflow serve`` (``medflow.access``), the file and every path it names must lie in
    the allowed folders; AccessRefused otherwise.
    """
    from medflow.access import check_allowed

    path = Path(path)
    check_allowed(path, "spec")
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec {str(path)!r}: {exc.strerror}") from exc
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec {str(path)!r} is {len(text):,} bytes; a spec is at most {MAX_SPEC_BYTES:,}")
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {str(path)!r} is not valid YAML: {exc}") from exc
    if overrides:
        if not isinstance(data, dict):
            raise SpecError(f"a spec is a YAML mapping; received {type(data).__name__}")
        data = apply_overrides(data, overrides)
    try:
        spec = parse_spec(data, base_dir=path.resolve().parent, check_paths=check_paths, ingest_only=ingest_only)
    except SpecError as exc:
        hint = _making_hint(text, exc.problems, path.resolve().parent)
        if hint:
            raise SpecError(f"{exc.args[0]}\n  {hint}", [*exc.problems, hint]) from None
        raise
    for field, value in (("data.source", spec.data.source), ("data.store", spec.data.store),
                         ("data.runs", spec.data.runs),
                         ("data.labels.path", spec.data.labels.path if spec.data.labels else None),
                         ("data.masks.table", spec.data.masks.table if spec.data.masks else None),
                         ("data.marks.table", spec.data.marks.table if spec.data.marks else None)):
        if value:
            check_allowed(value, field)
    return spec


def _making_hint(text: str, problems: list[str], folder: Path) -> str | None:
    """For a missing source or label file: how the spec's own header says to make its data (the examples carry
    "Make the data with: medflow synth ..."), else how to point the spec at data or make a synthetic cohort."""
    import re

    if not any(p.startswith(("data.source: folder not found", "data.labels.path: file not found")) for p in problems):
        return None
    made = re.search(r"^#.*?[Mm]ake the data with:?\s*(.+)$", text, re.M)
    if made:
        return (f"data: the spec's header says how to make its data: `{made.group(1).strip()}` (its paths are "
                f"relative to {str(folder)!r})")
    return (f"data: point data.source (and data.labels.path) at your files (relative to {str(folder)!r}), or make a "
            "synthetic cohort to try medflow: `medflow synth DIR` (CT), with `--kind xray` or `--kind ecg`")


def json_schema() -> dict:
    """The JSON Schema of the spec."""
    return PipelineSpec.model_json_schema()


def as_spec(spec: PipelineSpec | str | Path, *, ingest_only: bool = False) -> PipelineSpec:
    """A validated spec from a spec or a path to one (``ingest_only``: see ``parse_spec``)."""
    return spec if isinstance(spec, PipelineSpec) else load_spec(spec, ingest_only=ingest_only)
