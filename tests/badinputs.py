"""A corpus of bad or unusual inputs, written at test time, each with the outcome the system must give.

``CASES`` lists them (id, one-line description, expected outcome, code, the run modality the outcome is
for); ``write_corpus(folder)`` writes every file and returns ``{id: BadInput}``. The session fixture
``bad_inputs`` (tests/conftest.py) calls it once. Outcomes:

* ``unreadable``: ``read_image`` raises ``ImageReadError`` whose reason contains ``code``;
* ``refused``: ``read_image`` raises ``ImageRefusedError`` with ``code`` (header checks), or
  ``assess(image, modality)`` lists ``code`` among its refusals: no label and no probability;
* ``warned``: readable, nothing refused, ``code`` among the warnings;
* ``handled``: readable, no refusal and no warning.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydicom.uid import BasicTextSRStorage

from covidscan.data.synthetic import make_phantom
from dicom_files import write_dicom

OUTCOMES = ("unreadable", "refused", "warned", "handled")
BOMB_SIDE = 12000


@dataclass(frozen=True)
class Case:
    """How to write one corpus entry and what must happen to it."""

    id: str
    description: str
    outcome: str
    code: str | None  # refusal/warning code, or text in the ImageReadError reason; None for handled
    modality: str  # the run ("ct" or "cxr") the outcome holds for
    write: Callable[[Path], Path]


@dataclass(frozen=True)
class BadInput:
    """A written corpus entry."""

    id: str
    description: str
    outcome: str
    code: str | None
    modality: str
    path: Path


def _ct(size: int = 256) -> np.ndarray:
    return make_phantom(3, modality="ct", covid=False, size=size).image


def _cxr() -> np.ndarray:
    return make_phantom(4, modality="cxr", covid=False, size=256).image


def _u8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)


def _png(name: str, pixels: np.ndarray) -> Callable[[Path], Path]:
    """Any PIL-writable array under ``name`` (its suffix picks the format); floats in [0, 1] become 8-bit."""

    def write(folder: Path) -> Path:
        Image.fromarray(_u8(pixels) if pixels.dtype == np.float32 else pixels).save(folder / name)
        return folder / name

    return write


def _bytes(name: str, make: Callable[[], bytes]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(make())
        return folder / name

    return write


def _encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _truncated(fmt: str) -> bytes:
    whole = _encoded(Image.fromarray(_u8(_ct())), fmt)
    return whole[: len(whole) // 2]


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit gray PNG of side x side black pixels: about 17 KB on disk, 144 Mpx once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte "none" + the packed bits of one row
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, gray, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * side, 9))
            + chunk(b"IEND", b""))


def _hu(pixels: np.ndarray) -> np.ndarray:
    """Phantom display values back to Hounsfield units under the lung window (width 1500, level -600)."""
    return np.rint(pixels * 1500 - 1350).astype(np.int16)


def _dicom(name: str, stored: np.ndarray | None = None, **kwargs: object) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        return write_dicom(folder / name, _hu(_ct()) if stored is None else stored, **kwargs)

    return write


def cropped_ct() -> np.ndarray:
    """A CT slice cut tightly around the lungs, chest wall in the corners, as in many paper figures.

    The phantom is cut at its lungs' bounding box, the air left in the corners becomes body tissue and a
    narrow window makes tissue near white (as a lung window shows soft tissue), so the corners are far
    brighter than the middle: exactly what made the old corner rule call such slices inverted.
    """
    phantom = make_phantom(3, modality="ct", covid=False, size=320)
    rows, cols = np.nonzero(phantom.lung_mask)
    pixels = phantom.image[rows.min() - 4 : rows.max() + 5, cols.min() - 4 : cols.max() + 5].copy()
    _, parts = cv2.connectedComponents((pixels < 0.08).astype(np.uint8))
    border = np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))
    pixels[np.isin(parts, border[border > 0])] = np.median(pixels[(pixels > 0.45) & (pixels < 0.8)])
    return np.clip((pixels - 0.25) / 0.4, 0, 1).astype(np.float32)


def _folder(name: str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).mkdir()
        (folder / name / "notes.txt").write_text("no images here\n")
        return folder / name

    return write


def _blank() -> np.ndarray:
    noise = np.random.default_rng(0).integers(-1, 2, (256, 256))
    return (128 + noise).astype(np.uint8)


def _tiff_pages(name: str, pages: list[np.ndarray]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        first, *rest = (Image.fromarray(_u8(page)) for page in pages)
        first.save(folder / name, save_all=True, append_images=rest)
        return folder / name

    return write


def _hu_tiff(name: str, dtype: type) -> Callable[[Path], Path]:
    """A CT slice in Hounsfield units (negative values) as a signed 16- or 32-bit integer TIFF."""

    def write(folder: Path) -> Path:
        hu = _hu(_ct())
        if dtype is np.int16:  # no int16 mode in PIL: the bits as uint16, declared signed (SampleFormat 2)
            Image.fromarray(hu.view(np.uint16)).save(folder / name, tiffinfo={339: 2})
        else:
            Image.fromarray(hu.astype(dtype)).save(folder / name)
        return folder / name

    return write


def photo() -> np.ndarray:
    """A colour snapshot: sky, grass and an orange cat-like shape, with sensor noise."""
    img = np.zeros((240, 320, 3), np.uint8)
    img[:] = (90, 140, 60)
    img[:80] = (150, 190, 235)
    cv2.ellipse(img, (160, 150), (70, 55), 0, 0, 360, (200, 120, 40), -1)
    cv2.circle(img, (215, 105), 35, (210, 130, 50), -1)
    return np.clip(img + np.random.default_rng(1).normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def screenshot() -> np.ndarray:
    """A listing window: title bar and lines of text on white."""
    img = np.full((300, 400, 3), 245, np.uint8)
    cv2.rectangle(img, (0, 0), (400, 30), (60, 60, 70), -1)
    for i, y in enumerate(range(60, 290, 22)):
        cv2.putText(img, f"Patient list  item {i}  status OK  2020-03-{i + 1:02d}", (12, y),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
    return img


def framed_black() -> np.ndarray:
    """A black picture in a white frame."""
    img = np.zeros((256, 256), np.uint8)
    cv2.rectangle(img, (0, 0), (255, 255), 255, 12)
    return img


def _rgba(pixels: np.ndarray) -> np.ndarray:
    gray = _u8(pixels)
    return np.dstack([gray, gray, gray, np.full_like(gray, 255)])


CASES: tuple[Case, ...] = (
    Case("empty_file", "a 0-byte file named .png", "unreadable", "empty", "ct", _bytes("empty.png", bytes)),
    Case("truncated_png", "a PNG cut in half", "unreadable", "truncated", "ct",
         _bytes("truncated.png", lambda: _truncated("PNG"))),
    Case("truncated_jpeg", "a JPEG cut in half", "unreadable", "truncated", "ct",
         _bytes("truncated.jpg", lambda: _truncated("JPEG"))),
    Case("text_as_png", "a text file named .png", "unreadable", "not a PNG, JPEG, BMP, TIFF or DICOM", "ct",
         _bytes("notes.png", lambda: b"patient list\nnot an image\n")),
    Case("pdf_as_png", "a PDF named .png", "unreadable", "PDF document", "ct",
         _bytes("report.png", lambda: b"%PDF-1.4\n%fake pdf\n" * 10)),
    Case("missing_path", "a path that does not exist", "unreadable", "does not exist", "ct",
         lambda folder: folder / "no-such-scan.png"),
    Case("folder_no_images", "a folder holding no images, given as an image", "unreadable", "folder", "ct",
         _folder("empty-study")),
    Case("png_1x1", "a 1x1 PNG", "refused", "tiny", "ct", _png("one.png", np.full((1, 1), 90, np.uint8))),
    Case("png_5000x1", "a 5000x1 PNG strip", "refused", "elongated", "ct",
         _png("strip.png", np.tile(np.arange(250, dtype=np.uint8), 20)[None, :])),
    Case("png_all_black", "an all-black 256x256 PNG", "refused", "constant", "ct",
         _png("black.png", np.zeros((256, 256), np.uint8))),
    Case("png_constant_gray", "a uniform gray 256x256 PNG", "refused", "constant", "ct",
         _png("gray.png", np.full((256, 256), 128, np.uint8))),
    Case("png_blank_noise", "gray 128 with +-1 level of noise", "refused", "blank", "ct",
         _png("blank.png", _blank())),
    Case("png_bomb", f"a 17 KB PNG whose header declares {BOMB_SIDE}x{BOMB_SIDE} pixels", "refused",
         "too_large", "ct", _bytes("bomb.png", bomb_png)),
    Case("png_small", "a 100x100 CT slice", "warned", "tiny", "ct", _png("small.png", _ct(100))),
    Case("png_16bit", "a 16-bit gray PNG CT slice", "handled", None, "ct",
         _png("sixteen.png", np.rint(_ct() * 65535).astype(np.uint16))),
    Case("png_rgba", "an RGBA PNG CT slice (opaque)", "handled", None, "ct", _png("rgba.png", _rgba(_ct()))),
    Case("png_palette", "a palette (P mode) PNG CT slice", "handled", None, "ct",
         lambda folder: _save(Image.fromarray(_u8(_ct())).quantize(64), folder / "palette.png")),
    Case("jpeg_cmyk", "a CMYK JPEG CT slice", "handled", None, "ct",
         lambda folder: _save(Image.fromarray(_u8(_ct())).convert("CMYK"), folder / "cmyk.jpg")),
    Case("tiff_float", "a 32-bit float TIFF CT slice in [0, 1]", "handled", None, "ct",
         lambda folder: _save(Image.fromarray(_ct(), "F"), folder / "float.tif")),
    Case("unicode_name", "a CT slice whose name has spaces, unicode and ../-like dots", "handled", None, "ct",
         _png("chest ü 名 ..-slice #1 (copy).png", _ct())),
    Case("ct_cropped", "a CT slice cut tightly around the lungs, tissue in the corners (not inverted)",
         "handled", None, "ct", _png("cropped.png", cropped_ct())),
    Case("ct_cropped_inverted", "the tightly cropped CT slice with inverted gray scale", "warned", "inverted",
         "ct", _png("cropped-inverted.png", 1 - cropped_ct())),
    Case("ct_inverted", "a CT slice with inverted gray scale (white air, dark tissue)", "warned", "inverted",
         "ct", _png("inverted.png", 1 - _ct())),
    Case("dicom_ct", "a CT DICOM in Hounsfield units", "handled", None, "ct",
         _dicom("ct.dcm", BodyPartExamined="CHEST")),
    Case("dicom_no_pixels", "a CT DICOM without pixel data", "unreadable", "no pixel data", "ct",
         _dicom("nopixels.dcm", pixel_data=False)),
    Case("dicom_sr", "a DICOM structured report (no pixels)", "unreadable", "no pixel data", "ct",
         _dicom("report.dcm", modality="SR", pixel_data=False, SOPClassUID=BasicTextSRStorage)),
    Case("dicom_mr", "an MR DICOM", "refused", "wrong_modality", "ct", _dicom("mr.dcm", modality="MR")),
    Case("dicom_us", "an ultrasound DICOM", "refused", "wrong_modality", "ct",
         _dicom("us.dcm", modality="US")),
    Case("dicom_no_modality", "a DICOM with an empty Modality", "refused", "missing_modality", "ct",
         _dicom("nomodality.dcm", modality="")),
    Case("dicom_ct_head", "a CT DICOM with BodyPartExamined HEAD", "refused", "body_part", "ct",
         _dicom("head.dcm", BodyPartExamined="HEAD")),
    Case("dicom_ct_abdomen", "a CT DICOM with BodyPartExamined ABDOMEN (lung bases may show)", "warned",
         "body_part", "ct", _dicom("abdomen.dcm", BodyPartExamined="ABDOMEN")),
    Case("dicom_ot", "a DICOM with Modality OT (other)", "warned", "other_modality", "ct",
         _dicom("ot.dcm", modality="OT")),
    Case("dicom_ct_for_cxr", "a CT DICOM given to an X-ray model", "refused", "wrong_modality", "cxr",
         _dicom("ct-to-cxr.dcm")),
    Case("dicom_multiframe", "a 2-frame CT DICOM", "unreadable", "multi-frame", "ct",
         _dicom("multiframe.dcm", np.zeros((512, 256), np.int16), Rows=256, NumberOfFrames=2)),
    Case("cxr_png_for_ct", "a chest X-ray PNG given to a CT model", "refused", "wrong_content", "ct",
         _png("xray.png", _cxr())),
    Case("ct_png_for_cxr", "a CT slice PNG given to an X-ray model", "refused", "wrong_content", "cxr",
         _png("ct-to-cxr.png", _ct())),
    Case("photo_colour", "a colour photo (a cat on grass) as JPEG", "refused", "wrong_content", "ct",
         _png("cat.jpg", photo())),
    Case("photo_gray", "the same photo in gray", "refused", "wrong_content", "ct",
         lambda folder: _save(Image.fromarray(photo()).convert("L"), folder / "cat-gray.jpg")),
    Case("screenshot", "a screenshot of a patient list", "refused", "wrong_content", "ct",
         _png("screenshot.png", screenshot())),
    Case("framed_black", "a black image with a white frame", "refused", "wrong_content", "ct",
         _png("framed.png", framed_black())),
    Case("tiff_multipage", "a 2-page TIFF of two CT slices", "unreadable", "multi-frame", "ct",
         _tiff_pages("pages.tif", [_ct(), _ct()[::-1]])),
    Case("tiff_multipage_black_first", "a 2-page TIFF whose first page is black", "unreadable", "multi-frame",
         "ct", _tiff_pages("black-first.tif", [np.zeros((256, 256), np.float32), _ct()])),
    Case("png_12bit", "12-bit data (0..4095) in a 16-bit PNG CT slice", "handled", None, "ct",
         _png("twelve.png", np.rint(_ct() * 4095).astype(np.uint16))),
    Case("tiff_int16_hu", "a CT slice in Hounsfield units as an int16 TIFF", "handled", None, "ct",
         _hu_tiff("hu16.tif", np.int16)),
    Case("tiff_int32_hu", "a CT slice in Hounsfield units as an int32 TIFF", "handled", None, "ct",
         _hu_tiff("hu32.tif", np.int32)),
    Case("dicom_cr_monochrome1", "a MONOCHROME1 CR radiograph", "handled", None, "cxr",
         _dicom("cr.dcm", np.rint((1 - _cxr()) * 4095).astype(np.uint16), modality="CR",
                photometric="MONOCHROME1", BodyPartExamined="CHEST")),
)
"""Every corpus entry; ``[c.id for c in CASES]`` parametrizes tests without writing anything."""


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def write_corpus(folder: Path) -> dict[str, BadInput]:
    """Write every case into ``folder`` and return them by id."""
    folder.mkdir(parents=True, exist_ok=True)
    return {c.id: BadInput(c.id, c.description, c.outcome, c.code, c.modality, c.write(folder))
            for c in CASES}
