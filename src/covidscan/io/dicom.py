"""DICOM reading with pydicom: modality LUT (Hounsfield units for CT), windowing, MONOCHROME1, series."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from covidscan.errors import ConfigError, ImageReadError

from .base import LUNG_WINDOW, ImageHeader, ImageMeta, LoadedImage, rgb_to_gray, scale_to_unit
from .quality import QualityLimits, check_pixel_count

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_MAGIC_OFFSET = 128  # Part 10 files: 128-byte preamble, then b"DICM"


def has_dicom_magic(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 ``DICM`` marker at byte 128 (whatever its name)."""
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: str | Path) -> bool:
    """True for ``.dcm``/``.dicom`` names and for any file with the ``DICM`` marker (PACS exports)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    try:
        width, level = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(f"DICOM window must be (width, level) numbers, got {window!r}") from None
    if not np.isfinite([width, level]).all() or width <= 0:
        raise ConfigError(f"DICOM window width must be a positive number, got (width, level) = {window!r}")
    return width, level


def apply_window(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Linear window (width, level): ``level - width/2 -> 0``, ``level + width/2 -> 1``, clipped, float32."""
    width, level = _check_window(window)
    return scale_to_unit(values, level - width / 2, level + width / 2)


def _stored_to_unit(arr: np.ndarray, ds: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """Grayscale stored values -> [0, 1] with air dark, following the DICOM display pipeline."""
    values = apply_modality_lut(arr, ds)  # Hounsfield units for CT
    if ds.get("Modality") == "CT":
        # HU have a fixed meaning (air -1000), so the window alone sets the display; MONOCHROME1 is moot.
        return apply_window(values, window or LUNG_WINDOW)
    if window is not None:
        unit = apply_window(values, window)
    elif ds.get("VOILUTSequence"):
        # Normalise by what the LUT can output, found by running its whole input domain through it.
        entries, first_mapped = ds.VOILUTSequence[0].LUTDescriptor[:2]
        lut = apply_voi(np.arange(first_mapped, first_mapped + (entries or 2**16)), ds)
        unit = scale_to_unit(apply_voi(values, ds), float(lut.min()), float(lut.max()))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # Values far outside any window land exactly on pydicom's output range ends.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
        unit = scale_to_unit(apply_windowing(values, ds), float(low), float(high))
    else:
        unit = scale_to_unit(values, float(values.min()), float(values.max()))
    if ds.PhotometricInterpretation == "MONOCHROME1":  # high values mean dark: invert so air is dark
        unit = np.subtract(1.0, unit, out=unit)
    return unit


def _optional_int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _slice_position(ds: Dataset) -> float | None:
    """Position along the slice normal, so oblique and non-axial series sort too (equals z for axial)."""
    try:
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
    except (AttributeError, TypeError, ValueError):
        return None
    if position.shape != (3,):
        return None
    try:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
        normal = np.cross(orientation[0], orientation[1])
    except (AttributeError, TypeError, ValueError):
        normal = np.array([0.0, 0.0, 1.0])
    return float(position @ normal)


def _meta(path: Path, ds: Dataset, shape: tuple[int, ...]) -> ImageMeta:
    def text(keyword: str) -> str | None:
        value = str(ds.get(keyword, "") or "").strip()
        return value or None

    return ImageMeta(
        path=path,
        format="DICOM",
        mode=text("PhotometricInterpretation") or "MONOCHROME2",
        original_size=(int(shape[0]), int(shape[1])),
        modality=text("Modality"),
        patient_id=text("PatientID"),
        series_uid=text("SeriesInstanceUID"),
        instance_number=_optional_int(ds.get("InstanceNumber")),
        slice_position=_slice_position(ds),
        body_part=text("BodyPartExamined"),
    )


def _where(source: str | Path | BinaryIO, name: str | Path | None) -> Path:
    """What errors and metadata call the image: ``name``, else the path, else ``<stream>``."""
    return Path(name if name is not None else source if isinstance(source, (str, Path)) else "<stream>")


def _dcmread(source: str | Path | BinaryIO, name: Path, **kwargs: object) -> Dataset:
    try:
        return pydicom.dcmread(source, **kwargs)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
        raise ImageReadError(
            name, f"not a readable DICOM file ({type(exc).__name__}: {exc})",
            "check the file is a complete DICOM export, not a truncated copy or another format named .dcm",
        ) from exc


def read_dicom_header(source: str | Path | BinaryIO, *, name: str | Path | None = None) -> ImageHeader:
    """Rows, Columns, frames, Modality and BodyPartExamined, read without touching the pixel data."""
    where = _where(source, name)
    ds = _dcmread(source, where, stop_before_pixels=True)
    rows, columns = _optional_int(ds.get("Rows")), _optional_int(ds.get("Columns"))
    if rows is None or columns is None:
        raise ImageReadError(where, "DICOM file has no Rows/Columns (not an image: a report or document?)",
                             "export the image instances of the study, not its reports")
    meta = _meta(where, ds, (rows, columns))
    return ImageHeader(path=where, format="DICOM", height=rows, width=columns,
                       frames=_optional_int(ds.get("NumberOfFrames", 1)) or 1,
                       modality=meta.modality, body_part=meta.body_part)


def read_dicom(
    source: str | Path | BinaryIO,
    *,
    name: str | Path | None = None,
    window: tuple[float, float] | None = None,
    limits: QualityLimits | None = None,
) -> LoadedImage:
    """Read a single-frame DICOM image: CT windowed in HU (default ``LUNG_WINDOW``), others by their VOI.

    ``source`` is a path or a binary file object (``name`` then names it in errors and metadata).
    ``limits.max_pixels`` is checked on Rows x Columns before the pixel data is decoded.
    """
    path = _where(source, name)
    if window is not None:
        _check_window(window)
    ds = _dcmread(source, path)
    if len(ds) == 0:
        raise ImageReadError(path, "DICOM file holds nothing after its header (corrupt or truncated)",
                             "export the image again from the PACS or viewer")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop_class = getattr(ds.get("SOPClassUID"), "name", None)
        raise ImageReadError(
            path, "DICOM file has no pixel data (it may be a report or structured document"
            + (f"; SOP class: {sop_class})" if sop_class else ")"),
            "export the image instances of the study, not its reports",
        )
    if _optional_int(ds.get("NumberOfFrames", 1)) not in (None, 0, 1):
        raise ImageReadError(
            path, f"multi-frame DICOM ({ds.NumberOfFrames} frames): export single slices",
            "export the series as one DICOM file per slice",
        )
    rows, columns = _optional_int(ds.get("Rows")), _optional_int(ds.get("Columns"))
    if rows is not None and columns is not None:
        check_pixel_count(path, rows, columns, 1, limits)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    colour = _optional_int(ds.get("SamplesPerPixel")) == 3
    if not colour and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            path, f"unsupported DICOM PhotometricInterpretation {photometric or '(missing)'}",
            "export the image as MONOCHROME2 or RGB",
        )
    try:
        arr = ds.pixel_array  # decodes compressed syntaxes (JPEG, JPEG 2000 via pylibjpeg); YBR -> RGB
        pixels = rgb_to_gray(arr, 2 ** int(ds.BitsStored) - 1) if colour else _stored_to_unit(arr, ds, window)
    except Exception as exc:  # missing decoder, corrupt or truncated pixel data, bad LUT/window attributes
        syntax = ds.file_meta.get("TransferSyntaxUID")
        syntax_name = getattr(syntax, "name", "unknown")
        hint = ("re-export the image uncompressed, or check pylibjpeg and pylibjpeg-openjpeg are installed"
                if syntax is not None and syntax.is_compressed
                else "the file looks truncated or its image attributes are wrong; export it again")
        raise ImageReadError(path, f"cannot decode DICOM pixel data (transfer syntax {syntax_name}): {exc}",
                             hint) from exc
    return LoadedImage(pixels=pixels, meta=_meta(path, ds, pixels.shape))


def _series_files(folder_or_files: str | Path | Iterable[str | Path]) -> tuple[Path, list[Path]]:
    """(where to point errors at, the files to read)."""
    if isinstance(folder_or_files, (str, Path)):
        folder = Path(folder_or_files)
        if not folder.is_dir():
            raise ImageReadError(folder, "not a folder", "pass the folder that holds one DICOM series")
        return folder, [p for p in sorted(folder.iterdir())
                        if p.is_file() and not p.name.startswith(".") and is_dicom_path(p)]
    files = [Path(p) for p in folder_or_files]
    return (files[0].parent if files else Path.cwd()), files


def read_dicom_series(
    folder_or_files: str | Path | Iterable[str | Path],
    *,
    series_uid: str | None = None,
    window: tuple[float, float] | None = None,
) -> list[LoadedImage]:
    """Read the DICOM slices of one series, ordered by slice position, then instance number, then name.

    A folder is searched (not recursively) for DICOM files by suffix or ``DICM`` marker. When the files
    belong to several series, pass ``series_uid`` to pick one; otherwise this raises ``ImageReadError``.
    """
    where, files = _series_files(folder_or_files)
    if not files:
        raise ImageReadError(where, "no DICOM files found", "DICOM files end in .dcm or have the DICM marker")
    groups: dict[str | None, list[LoadedImage]] = defaultdict(list)
    for file in files:
        image = read_dicom(file, window=window)
        groups[image.meta.series_uid].append(image)
    if series_uid is not None:
        if series_uid not in groups:
            raise ImageReadError(
                where, f"no slice belongs to series {series_uid}",
                f"series found: {', '.join(str(uid) for uid in groups)}",
            )
        slices = groups[series_uid]
    elif len(groups) > 1:
        found = "; ".join(f"{uid} ({len(items)} files)" for uid, items in groups.items())
        raise ImageReadError(where, f"files from {len(groups)} DICOM series: {found}",
                             "pass series_uid= to read one of them")
    else:
        slices = next(iter(groups.values()))

    def order(image: LoadedImage) -> tuple[bool, float, bool, int, str]:
        m = image.meta
        return (m.slice_position is None, m.slice_position or 0.0,
                m.instance_number is None, m.instance_number or 0, str(m.path))

    return sorted(slices, key=order)
