"""Volume-file sources: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) files, in
class folders or listed in a CSV, ingested into the same store as DICOM series.

NIfTI is read with nibabel (its RAS affine turned to LPS), NRRD and MetaImage with SimpleITK (LPS
already; ``read_volume`` says why not ITK for NIfTI too): voxels are placed in LPS millimetres, the
convention of DICOM and of the store, with NIfTI's ``scl_slope``/``scl_inter`` applied, so a volume
file and the DICOM series it came from give the same intensities at the same patient positions.
The file's voxel order is kept (as a DICOM series keeps its acquisition's) and its geometry goes
into the catalog the way a series' does: ``spacing`` (z, y, x), ``origin`` (LPS of voxel 0) and
``direction`` (rows: the unit vectors of array axes 0, 1, 2). Only pixels and geometry are read:
header text (NIfTI ``descrip``, ``aux_file``, extensions; NRRD and MetaImage key-value fields)
never reaches the store; nor do file or folder names (keys are pseudonyms of the content).
Unreadable, truncated, non-finite, zero-spacing, non-orthogonal and absurdly large files are
quarantined with the reason. No Prefect here: ``tasks/ingest.py`` runs these functions on Dask.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from storage.dicom import cast_volume, check_spacing, volume_dtype
from storage.errors import InvalidSeriesError
from storage.images import OUTSIDE_ROOTS, ImageItem, content_digest, ingest_files

logger = logging.getLogger(__name__)

SUFFIXES = {"nifti": (".nii", ".nii.gz"), "nrrd": (".nrrd", ".nhdr"), "mha": (".mha", ".mhd")}
VOLUME_SUFFIXES = tuple(s for group in SUFFIXES.values() for s in group)
COMPANIONS = (".raw", ".zraw", ".img")  # detached data of .mhd/.nhdr headers: listed with their header, not alone
MAX_VOXELS = 1_000_000_000  # a header declaring more is refused before its pixels are read
ORTHOGONAL_TOLERANCE = 1e-3


def volume_format(name: str) -> str | None:
    """The volume format of a file name by its suffix, or None.

    >>> volume_format("case_0000.nii.gz"), volume_format("ct.MHA"), volume_format("x.png")
    ('nifti', 'mha', None)
    """
    lower = name.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if lower.endswith(suffixes)), None)


def read_volume(path: str | Path, *, time_point: int | None = None) -> tuple[np.ndarray, dict]:
    """A volume file's voxels as (Z, Y, X) and its geometry ``{"spacing", "origin", "direction"}`` in the
    store's convention (LPS). A 2D file is one slice; a 4D file (time points, or channels as the Decathlon
    stores MR sequences) gives the volume ``time_point``.

    NIfTI is read with nibabel, NRRD and MetaImage with SimpleITK: ITK's NIfTI reader (SimpleITK 2.5)
    fills a truncated file's missing voxels with zeros, turns NaN into 0 and, given a sheared sform,
    falls back to another transform without a word; nibabel raises on the first and keeps the others
    for the checks here. ITK's NRRD and MetaImage readers raise on truncation and keep NaN.

    Raises:
        InvalidSeriesError: unreadable or truncated file, vector pixels, a 4D file without ``time_point``,
            a header of more than ``MAX_VOXELS`` voxels, non-finite values, impossible spacing, or axes that
            are not at right angles. The message never names the file.
    """
    if volume_format(str(path)) == "nifti":
        array, spacing, origin, direction = _read_nifti(path, time_point)
    else:
        array, spacing, origin, direction = _read_itk(path, time_point)
    spacing = check_spacing(spacing, "voxel spacing")
    if not np.all(np.isfinite(direction)) or not np.all(np.isfinite(origin)) or \
            np.abs(direction.T @ direction - np.eye(3)).max() > ORTHOGONAL_TOLERANCE:
        raise InvalidSeriesError("volume axes are not at right angles (a sheared or degenerate transform: "
                                 f"{direction.round(4).tolist()}); it cannot be stored as a series")
    if not np.issubdtype(array.dtype, np.integer):
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise InvalidSeriesError(f"volume holds {bad} non-finite voxel value(s) (NaN or infinity)")
    # array axes (x, y, z) of the file -> the store's (z, y, x); its direction rows follow the axes
    geometry = {"spacing": [float(spacing[2]), float(spacing[1]), float(spacing[0])],
                "origin": [float(v) for v in origin],
                "direction": [direction[:, 2].tolist(), direction[:, 1].tolist(), direction[:, 0].tolist()]}
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0))), geometry


def _check_size(size: list[int], time_point: int | None) -> None:
    if int(np.prod(size, dtype=np.float64)) > MAX_VOXELS:
        raise InvalidSeriesError(f"volume header declares {'x'.join(map(str, size))} voxels, more than "
                                 f"{MAX_VOXELS:,}; not read")
    if len(size) == 4:
        if time_point is None:
            raise InvalidSeriesError(f"4D volume ({size[3]} volumes along the 4th axis): set ingest.time_point to "
                                     "take one of them")
        if not 0 <= time_point < size[3]:
            raise InvalidSeriesError(f"4D volume with {size[3]} volumes along the 4th axis: ingest.time_point "
                                     f"{time_point} is not one of them")
    elif len(size) not in (2, 3):
        raise InvalidSeriesError(f"volume of {len(size)} dimensions; 2, 3 or 4 are read")


def _read_nifti(path, time_point):
    """(array indexed (x, y, z), spacing (x, y, z), origin, direction columns) of a NIfTI file, in LPS."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on a file that is not NIfTI
        raise InvalidSeriesError(f"unreadable NIfTI file ({type(exc).__name__})") from None
    if int(img.header.get("sform_code", 0)) == 0:  # qform or pixdim: the spacing is pixdim, as the file has it
        from nibabel.openers import ImageOpener

        with ImageOpener(str(path)) as fh:  # nibabel sets a zero pixdim to 1 as it loads (with a warning)
            raw = type(img.header).from_fileobj(fh, check=False)
        declared = [float(v) for v in raw["pixdim"][1:1 + min(3, len(img.shape))]]
        check_spacing(declared, "voxel spacing (pixdim)")
    shape = [int(v) for v in img.shape]
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    _check_size(shape, time_point)
    if img.get_data_dtype().fields is not None:
        raise InvalidSeriesError(f"volume of vector pixels ({img.get_data_dtype()}); a scalar volume is expected")
    try:
        data = img.dataobj  # scl_slope and scl_inter applied as the voxels are read
        if len(shape) == 4:
            array = np.asanyarray(data[..., int(time_point)])
        else:
            array = np.asanyarray(data).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file: gzip, EOF, short reads
        raise InvalidSeriesError(f"NIfTI file cannot be read whole (truncated or damaged: {type(exc).__name__})"
                                 ) from None
    array = array.reshape(array.shape[:3] if array.ndim >= 3 else (*array.shape, 1))
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(img.affine, dtype=float)[:3]  # nibabel's RAS -> LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / np.where(spacing > 0, spacing, 1.0)
    return array, spacing.tolist(), lps[:, 3], direction


def _read_itk(path, time_point):
    """(array indexed (x, y, z), spacing, origin, direction columns) of an NRRD or MetaImage file (LPS)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InvalidSeriesError("unreadable volume file: ITK reads no NRRD or MetaImage header in it") from None
    size = [int(v) for v in reader.GetSize()]
    _check_size(size, time_point)
    if reader.GetNumberOfComponents() != 1:
        raise InvalidSeriesError(f"volume of vector pixels ({reader.GetNumberOfComponents()} components per voxel); "
                                 "a scalar volume is expected")
    if len(size) == 4:
        reader.SetExtractIndex([0, 0, 0, int(time_point)])
        reader.SetExtractSize([size[0], size[1], size[2], 0])  # 0: that axis collapses
    try:
        image = reader.Execute()
        array = np.transpose(sitk.GetArrayFromImage(image))  # ITK's array is (z, y, x): back to index order
    except RuntimeError:
        raise InvalidSeriesError("volume file cannot be read whole (truncated, or its data file is missing)") from None
    n = image.GetDimension()
    spacing, origin = list(image.GetSpacing()), list(image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(n, n)  # column k: index axis k in LPS
    if n == 2:  # one slice: its normal completes the frame, 1 mm thick
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction, spacing, origin = d3, [*spacing, 1.0], [*origin, 0.0]
        array = array[..., None]
    return array, spacing, np.asarray(origin, dtype=float), direction


def volume_key(pseudo, digest: str) -> str:
    """The series key of a volume file: a pseudonym of its content."""
    return "v" + pseudo.key(digest, kind="volume")[:31]


def ingest_volumes(store_root: str, source: str, items: list[ImageItem], *, time_point: int | None = None,
                   modality: str = "OT") -> dict:
    """Write ``items`` (volume files) to the store (a Dask worker entry point); returns counts and quarantine
    rows, as ``storage.images.ingest_images`` does for images."""
    def read(path: Path) -> tuple[np.ndarray, dict, list[str]]:
        array, geometry = read_volume(path, time_point=time_point)
        volume = cast_volume(array, volume_dtype(modality, [array]))
        fields = {"modality": modality, **geometry, "spacing_source": "volume file header",
                  "source_format": volume_format(path.name)}
        if time_point is not None:
            fields["time_point"] = int(time_point)
        return volume, fields, []

    return ingest_files(store_root, source, items, kind="volume", digest_of=_volume_digest,
                        key_of=lambda pseudo, digest: volume_key(pseudo, f"{digest}:{time_point}"), read=read)


def _volume_digest(path: Path) -> str:
    """SHA-256 of a volume's bytes; a MetaImage or NRRD header (.mhd, .nhdr) with its detached data file."""
    digest = content_digest(path)
    if path.name.lower().endswith((".mhd", ".nhdr")):
        h = hashlib.sha256(digest.encode())
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=") if "=" in line else line.partition(":")
            name = value.strip()
            if key.strip().lower() in ("elementdatafile", "data file", "datafile") and name and \
                    name.upper() not in ("LOCAL", "LIST"):
                data = path.parent / name
                from medflow.access import is_inside

                if not is_inside(data):
                    raise ValueError(OUTSIDE_ROOTS)
                if data.is_file():
                    h.update(content_digest(data).encode())
        digest = h.hexdigest()
    return digest
