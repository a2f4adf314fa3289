"""One entry point for every image a user may hand us: PNG, JPEG, BMP, TIFF (any PIL mode) and DICOM."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from covidscan.errors import ConfigError, ImageReadError, ImageRefusedError, InputError, StorageError

from .base import LUNG_WINDOW, ImageHeader, ImageMeta, LoadedImage, rgb_to_gray, scale_to_unit
from .content import colour_fraction
from .dicom import DICOM_SUFFIXES, has_dicom_magic, is_dicom_path, read_dicom, read_dicom_header
from .quality import QualityLimits, QualityReport, check_pixel_count, gate

IMAGE_SUFFIXES: frozenset[str] = (
    frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}) | DICOM_SUFFIXES
)
# PIL warns from its own bomb limit before the header check below has run; covidscan's pixel limit
# (check_pixel_count) decides and says why, so PIL's warning would only be noise. A process-wide filter,
# because catch_warnings is not thread-safe and images are decoded in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_FORMAT_NAMES = {"MPO": "JPEG"}  # PIL's JPEG opener says MPO for phone JPEGs with extra preview frames
# First bytes of files often mistaken for images, to say what the file really is.
_SIGNATURES = {b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive", b"GIF8": "a GIF image",
               b"RIFF": "a RIFF/WebP file", b"<": "an HTML/XML text file"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_HU_LOWEST = (-3100.0, -500.0)  # where the darkest value of a CT slice in Hounsfield units lies
_HU_HIGHEST = 31000.0
_REDUCED_IMAGE = 1  # TIFF NewSubfileType bit: a thumbnail or preview of another page, not an image of its own


def is_image_path(path: str | Path) -> bool:
    """True for image suffixes (case-insensitive) and for DICOM files of any name (``DICM`` marker)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES or (path.is_file() and has_dicom_magic(path))


ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO
"""What ``read_image`` accepts: a path, the bytes of a file, or a binary file object (an upload)."""


def _check_file(path: Path, name: Path) -> None:
    if not path.exists():
        raise ImageReadError(name, "file does not exist", "check the path and its spelling")
    if path.is_dir():
        raise ImageReadError(name, "is a folder, not an image file", "use scan_images() for whole folders")
    if path.stat().st_size == 0:
        raise ImageReadError(name, "file is empty (0 bytes)", "the copy or download failed; fetch it again")


def _open_source(source: ImageSource, name: str | os.PathLike[str] | None) -> tuple[Path, Path | io.BytesIO]:
    """(what errors and metadata call the image, what PIL and pydicom open); empty or missing files raise."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = path if name is None else Path(name)
        _check_file(path, label)
        return label, path
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, default = bytes(source), "<bytes>"
    elif callable(getattr(source, "read", None)):
        own_name = getattr(source, "name", None)
        default = own_name if isinstance(own_name, str) else "<stream>"
        data = source.read()
        if not isinstance(data, bytes):
            raise ImageReadError(name or default, "the file object was opened in text mode",
                                 "open it in binary mode ('rb')")
    else:
        raise ImageReadError(name or f"<{type(source).__name__}>", f"cannot read a {type(source).__name__}",
                             "pass a path, the file's bytes or a binary file object")
    label = Path(name if name is not None else default)
    if not data:
        raise ImageReadError(label, "file is empty (0 bytes)", "the upload or copy failed; send it again")
    return label, io.BytesIO(data)


def _is_dicom(label: Path, opened: Path | io.BytesIO) -> bool:
    if isinstance(opened, Path):
        return is_dicom_path(opened)
    return label.suffix.lower() in DICOM_SUFFIXES or opened.getvalue()[128:132] == b"DICM"


def _not_an_image(label: Path, opened: Path | io.BytesIO) -> ImageReadError:
    try:
        if isinstance(opened, Path):
            with open(opened, "rb") as f:
                head = f.read(8).lstrip()
        else:
            head = opened.getvalue()[:8].lstrip()
    except OSError:
        head = b""
    what = next((name for sig, name in _SIGNATURES.items() if head.startswith(sig)), None)
    reason = f"it is {what}, not an image" if what else "not a PNG, JPEG, BMP, TIFF or DICOM image"
    return ImageReadError(label, reason, "convert it to PNG (or export the DICOM) and try again")


def _corrupt(label: Path, exc: Exception) -> ImageReadError:
    truncated = "truncated" in str(exc)
    return ImageReadError(
        label, f"{'truncated' if truncated else 'corrupt'} image file ({type(exc).__name__}: {exc})",
        "the file is incomplete; copy or export it again" if truncated
        else "open it in an image viewer; re-export or convert it to PNG",
    )


@contextmanager
def _open_pil(label: Path, opened: Path | io.BytesIO, limits: QualityLimits | None) -> Iterator[Image.Image]:
    """PIL's lazy open (header only), refusing over-limit sizes before anything is decoded."""
    try:
        im = Image.open(opened, formats=_PIL_FORMATS)
    except Image.UnidentifiedImageError:
        raise _not_an_image(label, opened) from None
    except Image.DecompressionBombError as exc:  # PIL's own, far higher limit: refuse the same way
        raise ImageRefusedError(label, [f"too_large: {exc}"], "downscale the image") from None
    except Exception as exc:  # a header PIL recognises but cannot parse
        raise _corrupt(label, exc) from exc
    with im:
        check_pixel_count(label, im.height, im.width, 1, limits)
        yield im


def _count_pages(label: Path, im: Image.Image) -> int:
    """How many full images a TIFF holds (thumbnails and previews of a page are not counted); 1 otherwise."""
    if im.format != "TIFF" or getattr(im, "n_frames", 1) == 1:
        return 1
    try:
        pages = 0
        for index in range(im.n_frames):
            im.seek(index)
            pages += not int(im.tag_v2.get(254, 0)) & _REDUCED_IMAGE
        im.seek(0)
    except Exception as exc:  # a page directory PIL cannot parse
        raise _corrupt(label, exc) from exc
    return pages


def _refuse_pages(label: Path, im: Image.Image) -> None:
    """Refuse a multi-page TIFF as multi-frame DICOM is refused: which page to judge is not ours to guess."""
    pages = _count_pages(label, im)
    if pages > 1:
        raise ImageReadError(label, f"multi-frame TIFF ({pages} pages): export single slices",
                             "save each page as its own image file")


def _declared_bits(im: Image.Image) -> int:
    """Bits per sample the file declares (TIFF BitsPerSample), else 16 (a 16-bit PNG opened as "I")."""
    bits = getattr(im, "tag_v2", {}).get(258, (16,))
    return int(bits[0] if isinstance(bits, tuple) else bits)


def _looks_like_hu(low: float, high: float) -> bool:
    """Whether a signed image's value range is that of a CT slice in Hounsfield units.

    Air is -1000 HU and scanners pad outside the field of view with -1024 to -3024, so the darkest value
    of a chest slice lies in [-3100, -500]; the brightest (bone, contrast, metal) stays below 31000.
    """
    return _HU_LOWEST[0] <= low <= _HU_LOWEST[1] and _HU_LOWEST[1] < high <= _HU_HIGHEST


def _data_range(arr: np.ndarray, declared_bits: int) -> tuple[float, float]:
    """The (low, high) that map to black and white for integer or float pixels, from the values themselves.

    Hounsfield units (negative values, see ``_looks_like_hu``) get the CT lung window, as CT DICOM does;
    other data with negative values is stretched min..max. Non-negative data is scaled by the bit depth it
    actually uses (12-bit data in a 16-bit PNG by 4095, not 65535, which left it nearly black and refused
    as blank), never beyond what the file declares: a dark 16-bit image stays dark.
    """
    low, high = float(arr.min()), float(arr.max())
    if low < 0:
        if _looks_like_hu(low, high):
            width, level = LUNG_WINDOW
            return level - width / 2, level + width / 2
        return low, high
    bits = min(declared_bits, max(8, int(np.ceil(np.log2(high + 1)))))
    return 0.0, 2.0**bits - 1


def _pil_to_gray(im: Image.Image) -> tuple[np.ndarray, float]:
    """Any PIL mode -> float32 (H, W) in [0, 1] (alpha composited onto black, colour to luminance) and the
    fraction of coloured pixels (``colour_fraction``; 0 for gray modes)."""
    mode = im.mode
    if mode in ("P", "PA") or (mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")  # palette lookup, applying a tRNS transparent colour as alpha
        mode = "RGBA"
    elif mode not in ("1", "L", "LA", "RGB", "RGBA", "F", "I", *_SIXTEEN_BIT_MODES):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ... via PIL's own conversions
        mode = "RGB"
    arr = np.asarray(im)
    if mode in ("1", "L"):
        return scale_to_unit(arr, 0.0, 1.0 if mode == "1" else 255.0), 0.0
    if mode in _SIXTEEN_BIT_MODES:
        return scale_to_unit(arr, *_data_range(arr, 16)), 0.0
    if mode == "I":
        return scale_to_unit(arr, *_data_range(arr, _declared_bits(im))), 0.0
    if mode == "F":
        if not np.isfinite(arr).all():
            raise ValueError("floating-point image contains NaN or infinite values")
        low, high = float(arr.min()), float(arr.max())
        # Float images have no fixed range: keep values already in [0, 1]; Hounsfield units get the lung
        # window; anything else is stretched min..max.
        if low >= 0.0 and high <= 1.0:
            return arr.astype(np.float32), 0.0
        return scale_to_unit(arr, *(_data_range(arr, 32) if low < 0 else (low, high))), 0.0
    if mode == "LA":
        gray, colour = scale_to_unit(arr[..., 0], 0.0, 255.0), 0.0
    else:
        gray, colour = rgb_to_gray(arr, 255.0), colour_fraction(arr, 255.0)
    if mode in ("LA", "RGBA"):
        gray *= arr[..., -1] / np.float32(255.0)  # composite onto black: transparent areas become dark
    return gray, colour


def _read_pil(label: Path, opened: Path | io.BytesIO, limits: QualityLimits | None) -> LoadedImage:
    with _open_pil(label, opened, limits) as im:
        fmt, mode = _FORMAT_NAMES.get(im.format or "", im.format or "?"), im.mode
        _refuse_pages(label, im)
        try:
            # PIL raises on truncated data as long as ImageFile.LOAD_TRUNCATED_IMAGES is False (the default),
            # which keeps half-decoded grey images out of training and prediction.
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # phone photos of films: show them upright
            pixels, colour = _pil_to_gray(im)
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error... on corrupt data
            raise _corrupt(label, exc) from exc
    size = (int(pixels.shape[0]), int(pixels.shape[1]))
    meta = ImageMeta(path=label, format=fmt, mode=mode, original_size=size, modality=None, patient_id=None,
                     colour=colour)
    return LoadedImage(pixels=pixels, meta=meta)


def read_image(
    source: ImageSource,
    *,
    name: str | os.PathLike[str] | None = None,
    window: tuple[float, float] | None = None,
    limits: QualityLimits | None = None,
) -> LoadedImage:
    """Read PNG/JPEG/BMP/TIFF/DICOM into float32 (H, W) gray in [0, 1] plus metadata.

    ``source`` is a path, the bytes of a file or a binary file object (an upload, read to its end);
    ``name`` is what errors and ``ImageMeta.path`` call it (default: the path, the file object's ``name``,
    else ``<bytes>``/``<stream>``). ``window`` (width, level) applies to DICOM only: for CT it is in
    Hounsfield units and defaults to ``LUNG_WINDOW``; for other modalities it replaces the file's own VOI
    window. Raises ``ImageReadError`` (naming the file, the reason and what to do) for anything that cannot
    be read, and ``ImageRefusedError`` (code ``too_large``) when the header declares more than
    ``limits.max_pixels`` pixels (default ``QualityLimits()``: ``$COVIDSCAN_MAX_PIXELS`` or 50 megapixels),
    before decoding anything. The rest of the quality gate is ``covidscan.io.gate``.
    """
    label, opened = _open_source(source, name)
    if _is_dicom(label, opened):
        return read_dicom(opened, name=label, window=window, limits=limits)
    return _read_pil(label, opened, limits)


def read_checked(
    source: ImageSource,
    modality: str | None = None,
    *,
    name: str | os.PathLike[str] | None = None,
    window: tuple[float, float] | None = None,
    limits: QualityLimits | None = None,
) -> tuple[LoadedImage, QualityReport]:
    """``read_image`` then the quality gate (:func:`gate` for ``modality``): the image and its warnings.

    Raises ``ImageReadError`` when the file cannot be read and ``ImageRefusedError`` (``.codes``, and every
    reason in the message) when the gate refuses it, from its header or its pixels: such an image must get
    no label and no probability.
    """
    loaded = read_image(source, name=name, window=window, limits=limits)
    return loaded, gate(loaded, modality, limits)


def check_header(
    source: ImageSource, *, name: str | os.PathLike[str] | None = None, limits: QualityLimits | None = None
) -> ImageHeader:
    """Read only the header (size, frames, DICOM Modality and BodyPartExamined) and apply the pixel limit.

    Raises ``ImageReadError`` when the header cannot be read and ``ImageRefusedError`` (``too_large``) when
    it declares more than ``limits.max_pixels`` pixels. A file object is read to its end.
    """
    label, opened = _open_source(source, name)
    if _is_dicom(label, opened):
        header = read_dicom_header(opened, name=label)
        check_pixel_count(label, header.height, header.width, header.frames, limits)
        return header
    with _open_pil(label, opened, limits) as im:
        fmt = _FORMAT_NAMES.get(im.format or "", im.format or "?")
        return ImageHeader(path=label, format=fmt, height=im.height, width=im.width,
                           frames=_count_pages(label, im))


def list_images(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Sorted image-like files under ``root`` (see ``is_image_path``), skipping hidden files and folders."""
    root = Path(root)
    if not root.is_dir():
        raise ImageReadError(root, "folder does not exist" if not root.exists() else "not a folder",
                             "pass the folder that holds the images")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")] if recursive else []
        found += [Path(folder, name) for name in files
                  if not name.startswith(".") and is_image_path(Path(folder, name))]
    return sorted(found)


def iter_images(
    paths_or_root: str | Path | Iterable[str | Path], *, window: tuple[float, float] | None = None
) -> Iterator[LoadedImage | InputError]:
    """Read a folder (recursively) or a list of files one at a time, yielding each image or its error."""
    is_folder = isinstance(paths_or_root, (str, Path)) and Path(paths_or_root).is_dir()
    if is_folder:
        paths: Iterable[str | Path] = list_images(paths_or_root)  # type: ignore[arg-type]
    elif isinstance(paths_or_root, (str, Path)):
        paths = [paths_or_root]
    else:
        paths = paths_or_root
    for path in paths:
        try:
            yield read_image(path, window=window)
        except InputError as err:  # unreadable, or refused from its header
            yield err


def scan_images(
    paths_or_root: str | Path | Iterable[str | Path], *, window: tuple[float, float] | None = None
) -> tuple[list[LoadedImage], list[InputError]]:
    """Read everything (a folder, recursively, or a list of files); bad files are collected, not raised."""
    images: list[LoadedImage] = []
    errors: list[InputError] = []
    for item in iter_images(paths_or_root, window=window):
        (errors if isinstance(item, InputError) else images).append(item)  # type: ignore[arg-type]
    return images, errors


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write a gray or BGR uint8 array as a PNG, parent folders created.

    Encoded by OpenCV and written by Python: ``cv2.imwrite`` crashes the whole process on a path that is not
    valid UTF-8. A write that fails (a full disk, a folder that is a file) is a StorageError naming ``path``.
    """
    import cv2  # PIL reads; OpenCV encodes faster and is imported by every caller anyway

    from covidscan.outputs import writing

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"cannot write {path}: give the PNG a .png name")
    ok, png = cv2.imencode(".png", pixels)
    if not ok:
        raise StorageError(f"cannot encode {path} as PNG ({pixels.dtype}, shape {pixels.shape})")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png.tobytes())
    return path
