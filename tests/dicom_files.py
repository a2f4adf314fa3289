"""Writing small DICOM files for tests (what scanners and PACS exports look like)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_dicom(path: Path, stored: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
                pixel_data: bool = True, **attrs) -> Path:
    """A minimal single-frame DICOM file (explicit VR little endian) with the given stored values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PhotometricInterpretation = modality, "P-001", photometric
    ds.SeriesInstanceUID = attrs.pop("SeriesInstanceUID", "1.2.3.4")
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 3 if stored.ndim == 3 else 1
    if stored.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = stored.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
