"""covidscan.io: every image mode and DICOM flavour to gray float in [0, 1], and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from covidscan.errors import ConfigError, ImageReadError
from covidscan.io import (
    IMAGE_SUFFIXES,
    LUNG_WINDOW,
    is_image_path,
    iter_images,
    list_images,
    read_dicom_series,
    read_image,
    scan_images,
    to_uint8,
)
from covidscan.io.base import unit_histogram
from dicom_files import write_dicom

LUMA = np.array([0.299, 0.587, 0.114])


def save(tmp_path: Path, name: str, image: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def luma(*rgb: float) -> float:
    return float(np.dot(LUMA, rgb) / 255.0)


# ---------------------------------------------------------------- ordinary image files, every PIL mode


def test_l_png_exact_values_and_meta(tmp_path):
    values = np.array([[0, 1, 128], [200, 254, 255]], dtype=np.uint8)
    loaded = read_image(save(tmp_path, "l.png", Image.fromarray(values)))
    assert loaded.pixels.dtype == np.float32 and loaded.pixels.shape == (2, 3)
    np.testing.assert_array_equal(loaded.pixels, values.astype(np.float32) / np.float32(255))
    meta = loaded.meta
    assert (meta.format, meta.mode, meta.original_size) == ("PNG", "L", (2, 3))
    assert meta.modality is None and meta.patient_id is None and meta.series_uid is None


@pytest.mark.parametrize(("name", "fmt"), [("a16.png", "PNG"), ("a16.tif", "TIFF")])
def test_16bit_scaled_by_full_range_not_clipped(tmp_path, name, fmt):
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    loaded = read_image(save(tmp_path, name, Image.fromarray(values)))
    assert (loaded.meta.format, loaded.meta.mode) == (fmt, "I;16")
    np.testing.assert_allclose(loaded.pixels, values / 65535.0, atol=1e-7)
    assert loaded.pixels[1, 1] == 1.0 and 0.6 < loaded.pixels[1, 0] < 0.62  # not saturated at 255


def test_32bit_integer_tiff_uses_declared_signed_range(tmp_path):
    values = np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32)
    loaded = read_image(save(tmp_path, "i32.tif", Image.fromarray(values)))
    assert loaded.meta.mode == "I"
    np.testing.assert_allclose(loaded.pixels, [[0.0, 0.5, 1.0]], atol=1e-6)


def test_float_tiff_kept_in_unit_range_else_stretched(tmp_path):
    unit = np.array([[0.25, 0.5, 0.75]], dtype=np.float32)
    assert read_image(save(tmp_path, "f1.tif", Image.fromarray(unit))).meta.mode == "F"
    np.testing.assert_array_equal(read_image(tmp_path / "f1.tif").pixels, unit)
    wide = np.array([[-100.0, 0.0, 300.0]], dtype=np.float32)
    np.testing.assert_allclose(read_image(save(tmp_path, "f2.tif", Image.fromarray(wide))).pixels,
                               [[0.0, 0.25, 1.0]])


def test_rgb_to_float_luminance_without_rounding(tmp_path):
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 21, 33]]], dtype=np.uint8)
    image = Image.fromarray(colours)
    loaded = read_image(save(tmp_path, "rgb.png", image))
    expected = [luma(*c) for c in colours[0]]
    np.testing.assert_allclose(loaded.pixels[0], expected, atol=1e-6)
    # Same weights as PIL "L", minus its rounding to whole grey levels.
    assert np.abs(loaded.pixels * 255 - np.asarray(image.convert("L"))).max() <= 0.5
    assert loaded.meta.mode == "RGB"


def test_rgba_alpha_composited_onto_black(tmp_path):
    pixels = np.array([[[255, 255, 255, 0], [255, 255, 255, 128], [40, 80, 120, 255], [255, 0, 0, 0]]],
                      dtype=np.uint8)
    loaded = read_image(save(tmp_path, "rgba.png", Image.fromarray(pixels, "RGBA")))
    np.testing.assert_allclose(loaded.pixels[0], [0.0, 128 / 255, luma(40, 80, 120), 0.0], atol=1e-6)
    assert loaded.meta.mode == "RGBA"


def test_la_alpha_composited_onto_black(tmp_path):
    loaded = read_image(save(tmp_path, "la.png", Image.new("LA", (3, 2), (200, 100))))
    assert loaded.meta.mode == "LA"
    np.testing.assert_allclose(loaded.pixels, np.full((2, 3), 200 / 255 * 100 / 255), atol=1e-6)


def test_palette_with_transparency(tmp_path):
    image = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    image.putpalette([255, 255, 255, 255, 0, 0, 0, 128, 0])
    loaded = read_image(save(tmp_path, "p.png", image, transparency=0))
    assert loaded.meta.mode == "P"
    np.testing.assert_allclose(loaded.pixels[0], [0.0, luma(255, 0, 0), luma(0, 128, 0)], atol=1e-6)


def test_one_bit_bmp_and_cmyk(tmp_path):
    bits = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).convert("1")
    loaded = read_image(save(tmp_path, "bits.bmp", bits))
    assert (loaded.meta.format, loaded.meta.mode) == ("BMP", "1")
    np.testing.assert_array_equal(loaded.pixels, [[0.0, 1.0, 0.0]])
    rgb_bmp = read_image(save(tmp_path, "rgb.bmp", Image.new("RGB", (2, 2), (30, 60, 90))))
    assert (rgb_bmp.meta.format, rgb_bmp.meta.mode) == ("BMP", "RGB")
    np.testing.assert_allclose(rgb_bmp.pixels, luma(30, 60, 90), atol=1e-6)
    cmyk = read_image(save(tmp_path, "cmyk.tif", Image.new("CMYK", (2, 2), (10, 20, 30, 40))))
    assert cmyk.meta.mode == "CMYK"
    np.testing.assert_allclose(cmyk.pixels, luma(*Image.new("CMYK", (1, 1), (10, 20, 30, 40))
                                                 .convert("RGB").getpixel((0, 0))), atol=1e-6)


def test_jpeg_gray_and_exif_rotation(tmp_path):
    flat = read_image(save(tmp_path, "flat.jpg", Image.new("L", (8, 8), 100)))
    assert (flat.meta.format, flat.meta.mode, flat.meta.original_size) == ("JPEG", "L", (8, 8))
    np.testing.assert_allclose(flat.pixels, 100 / 255, atol=1 / 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display upright
    rotated = read_image(save(tmp_path, "phone.jpg", Image.new("L", (16, 8), 100), exif=exif))
    assert rotated.pixels.shape == (16, 8) and rotated.meta.original_size == (16, 8)


# ---------------------------------------------------------------- DICOM


def test_ct_rescale_to_hu_then_lung_window_exact(tmp_path):
    hu = np.array([[-2000, -1350, -1000], [-600, 150, 1000]], dtype=np.int16)
    stored = ((hu + 1024) // 2).astype(np.int16)  # slope 2, intercept -1024 -> back to the HU above
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024,
                       InstanceNumber=7, ImagePositionPatient=[0, 0, -42.5])
    loaded = read_image(path)
    width, level = LUNG_WINDOW
    expected = np.clip((hu - (level - width / 2)) / width, 0, 1)
    np.testing.assert_allclose(loaded.pixels, expected, atol=1e-6)
    np.testing.assert_allclose(loaded.pixels, [[0, 0, 350 / 1500], [0.5, 1, 1]], atol=1e-6)
    soft = read_image(path, window=(400, 40)).pixels  # mediastinal window: -160..240 HU
    np.testing.assert_allclose(soft, [[0, 0, 0], [0, 310 / 400, 1]], atol=1e-6)
    meta = loaded.meta
    assert (meta.format, meta.mode, meta.modality, meta.patient_id) == ("DICOM", "MONOCHROME2", "CT", "P-001")
    assert (meta.series_uid, meta.instance_number, meta.slice_position) == ("1.2.3.4", 7, -42.5)
    assert meta.original_size == (2, 3)


@pytest.mark.parametrize("window", [(0, 40), (-5, 0), ("wide", 0), (1, 2, 3)])
def test_bad_window_is_a_config_error(tmp_path, window):
    path = write_dicom(tmp_path / "ct.dcm", np.zeros((2, 2), np.int16))
    with pytest.raises(ConfigError, match="window"):
        read_image(path, window=window)


def test_monochrome1_without_window_min_max_inverted(tmp_path):
    stored = np.array([[0, 100], [200, 400]], dtype=np.uint16)
    loaded = read_image(write_dicom(tmp_path / "cr.dcm", stored, modality="CR", photometric="MONOCHROME1"))
    np.testing.assert_allclose(loaded.pixels, [[1.0, 0.75], [0.5, 0.0]], atol=1e-6)
    assert (loaded.meta.mode, loaded.meta.modality) == ("MONOCHROME1", "CR")


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_file_voi_window_for_radiographs(tmp_path, photometric):
    stored = np.array([[0, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "dx.dcm", stored, modality="DX", photometric=photometric,
                       WindowCenter=1500.5, WindowWidth=1001)
    # DICOM LINEAR windowing uses centre - 0.5 and width - 1: here 1000..2000 spans the whole output range.
    expected = np.array([[0.0, 0.0, 0.5, 1.0, 1.0]])
    pixels = read_image(path).pixels
    np.testing.assert_allclose(pixels, expected if photometric == "MONOCHROME2" else 1 - expected, atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first stored value mapped is 10, 8-bit output
    item.add_new("LUTData", "US", [0, 50, 100, 200])
    path = write_dicom(tmp_path / "lut.dcm", np.array([[5, 10, 11, 12, 13, 99]], dtype=np.uint16),
                       modality="DX", VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(read_image(path).pixels, [[0, 0, 0.25, 0.5, 1, 1]], atol=1e-6)


def test_rgb_dicom_to_luminance(tmp_path):
    stored = np.array([[[255, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    loaded = read_image(write_dicom(tmp_path / "rgb.dcm", stored, modality="OT", photometric="RGB"))
    np.testing.assert_allclose(loaded.pixels, [[luma(255, 0, 0), luma(10, 20, 30)]], atol=1e-6)


def test_dicom_without_suffix_found_by_magic(tmp_path):
    path = write_dicom(tmp_path / "IM000001", np.full((2, 2), 24, np.int16), RescaleSlope=1,
                       RescaleIntercept=-624)
    assert is_image_path(path) and not is_image_path(tmp_path / "notes")
    assert list_images(tmp_path) == [path]
    np.testing.assert_allclose(read_image(path).pixels, 0.5, atol=1e-6)  # -600 HU, the window level


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", np.zeros((2, 2), np.int16), pixel_data=False)
    with pytest.raises(ImageReadError, match=r"no pixel data \(it may be a report.*CT Image Storage") as info:
        read_image(path)
    assert str(path) in str(info.value) and info.value.hint


def test_multiframe_dicom_rejected(tmp_path):
    path = write_dicom(tmp_path / "mf.dcm", np.zeros((4, 2), np.int16), Rows=2, NumberOfFrames=2)
    with pytest.raises(ImageReadError, match=r"multi-frame DICOM.*export single slices"):
        read_image(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_corrupt_and_truncated_dicom(tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"junk" * 10)
    noheader = tmp_path / "noheader.dcm"
    noheader.write_bytes(b"this is not dicom at all" * 20)
    whole = write_dicom(tmp_path / "whole.dcm", np.zeros((64, 64), np.int16)).read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(whole[: len(whole) - 4000])  # DICM magic kept, half of the pixel data gone
    for path, reason in [(garbage, "corrupt"), (noheader, "not a readable DICOM"), (cut, "pixel data")]:
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(path)
        assert str(path) in str(info.value) and info.value.hint


def test_dicom_series_sorted_by_position_and_split_by_series(tmp_path):
    for n, z in enumerate([10.0, -5.0, 2.5]):
        write_dicom(tmp_path / f"s{n}.dcm", np.full((2, 2), n, np.int16), InstanceNumber=n + 1,
                    ImagePositionPatient=[0, 0, z], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    series = read_dicom_series(tmp_path)
    assert [s.meta.slice_position for s in series] == [-5.0, 2.5, 10.0]
    assert [s.meta.instance_number for s in series] == [2, 3, 1]
    write_dicom(tmp_path / "other.dcm", np.zeros((2, 2), np.int16), SeriesInstanceUID="9.9")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_dicom_series(tmp_path)
    assert [s.meta.path.name for s in read_dicom_series(tmp_path, series_uid="9.9")] == ["other.dcm"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM files"):
        read_dicom_series(tmp_path / "empty")


# ---------------------------------------------------------------- bad inputs


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, text expected in the reason)."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    png, jpg = save(tmp_path, "good.png", noise), save(tmp_path, "good.jpg", noise)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    (tmp_path / "trunc.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "paper.png").write_bytes(b"%PDF-1.4\n%fake pdf\n" * 10)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    return {
        "empty": (tmp_path / "empty.png", "empty"),
        "truncated png": (tmp_path / "trunc.png", "truncated"),
        "truncated jpeg": (tmp_path / "trunc.jpg", "truncated"),
        "text named png": (tmp_path / "text.png", "not a PNG, JPEG, BMP, TIFF or DICOM"),
        "pdf named png": (tmp_path / "paper.png", "PDF document"),
        "txt": (tmp_path / "notes.txt", "not a PNG"),
        "directory": (tmp_path / "folder.png", "folder"),
        "missing": (tmp_path / "missing.png", "does not exist"),
    }


def test_bad_inputs_raise_image_read_error_naming_the_file(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # what makes truncated files fail instead of going grey
    for name, (path, reason) in bad_inputs(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        message = str(info.value)
        assert str(path) in message and reason in info.value.reason, name
        assert info.value.hint, name


def test_scan_images_carries_on_past_bad_files(tmp_path):
    cases = bad_inputs(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "sub").mkdir()
    save(tmp_path / "sub", "deep.bmp", Image.new("L", (2, 2), 7))
    images, errors = scan_images(tmp_path)
    assert sorted(i.meta.path.name for i in images) == ["deep.bmp", "good.jpg", "good.png"]
    # Every image-named bad file is reported; .txt and .DS_Store are not images, folder.png is walked into.
    expected_errors = ["empty.png", "paper.png", "text.png", "trunc.jpg", "trunc.png"]
    assert sorted(e.path.name for e in errors) == expected_errors
    images, errors = scan_images([cases["missing"][0], tmp_path / "good.png"])
    assert len(images) == 1 and [e.path for e in errors] == [cases["missing"][0]]
    assert isinstance(next(iter_images(tmp_path / "good.png")).pixels, np.ndarray)


def test_list_images_sorted_skips_hidden_and_non_images(tmp_path):
    for name in ["b.PNG", "a.jpeg", ".hidden.png", "._a.jpeg", "readme.txt", "x.tiff"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c.png").write_bytes(b"x")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "d.dcm").write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.jpeg", "b.PNG", "nested/d.dcm", "x.tiff"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.jpeg", "b.PNG", "x.tiff"]
    assert {".png", ".jpg", ".dcm", ".tif"} <= IMAGE_SUFFIXES
    with pytest.raises(ImageReadError, match="does not exist"):
        list_images(tmp_path / "nope")


def test_to_uint8_rounds_and_clips():
    pixels = np.array([[-0.2, 0.0, 0.5, 127.4 / 255, 1.0, 1.7]], dtype=np.float32)
    out = to_uint8(pixels)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 128, 127, 255, 255]])
    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(levels / np.float32(255)), levels)  # lossless round trip


# ---------------------------------------------------------------- real files from ../shared


def test_real_raw_formats_read_with_their_mode(shared_dir):
    files = sorted((shared_dir / "data" / "raw-formats").rglob("*.*"))
    assert len(files) >= 10
    for path in files:
        loaded = read_image(path)
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
        assert loaded.meta.mode == mode and loaded.meta.original_size == (h, w), path
        assert loaded.pixels.dtype == np.float32 and loaded.pixels.shape == (h, w), path
        assert 0.0 <= loaded.pixels.min() < loaded.pixels.max() <= 1.0, path
        assert loaded.meta.format in ("PNG", "JPEG"), path


def test_real_ct_dicom_windowed_in_hu(shared_dir):
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = shared_dir / "data" / "dicom" / "CT_small.dcm"
    loaded = read_image(path)
    assert (loaded.meta.modality, loaded.meta.original_size) == ("CT", (128, 128))
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert -1100 < hu.min() < -500 and hu.max() > 500  # air-filled lung and bone in the crop
    np.testing.assert_allclose(loaded.pixels, np.clip((hu + 1350) / 1500, 0, 1), atol=1e-6)
    assert loaded.pixels.max() == 1.0 and loaded.pixels.min() < 0.4
    assert loaded.meta.slice_position is not None and loaded.meta.patient_id


def test_real_jpeg2000_monochrome1_radiograph(shared_dir):
    loaded = read_image(shared_dir / "data" / "dicom" / "RG1_J2KR.dcm")
    pixels = loaded.pixels
    assert pixels.shape == (1955, 1841) and pixels.dtype == np.float32
    assert (loaded.meta.mode, loaded.meta.modality) == ("MONOCHROME1", "CR")
    h, w = pixels.shape
    rows = slice(int(0.3 * h), int(0.6 * h))
    right_lung, left_lung = pixels[rows, int(0.2 * w):int(0.4 * w)], pixels[rows, int(0.6 * w):int(0.8 * w)]
    mediastinum = pixels[rows, int(0.45 * w):int(0.55 * w)]
    # MONOCHROME1 inverted: air-filled lungs darker than the mediastinum (0.64 / 0.60 vs 0.87 here).
    assert max(right_lung.mean(), left_lung.mean()) < mediastinum.mean() - 0.15


@pytest.mark.parametrize("bins", [1, 2, 16, 32])
def test_unit_histogram_counts_exactly_as_numpy(bins: int):
    rng = np.random.default_rng(0)
    edges = np.arange(bins + 1) / bins
    samples = [
        rng.random(10_000, dtype=np.float32),
        (rng.integers(0, 256, 5_000) / 255).astype(np.float32),  # 8-bit levels
        rng.integers(0, 65536, 5_000) / 65535,  # 16-bit levels, float64
        # on and just beside every edge, outside [0, 1], NaN and infinities: left out as numpy leaves them
        np.concatenate([edges, np.nextafter(edges, -1), np.nextafter(edges, 2),
                        [-1e-9, 1 + 1e-7, np.nan, np.inf, -np.inf]]).astype(np.float32),
    ]
    for values in samples:
        expected = np.histogram(values, bins=bins, range=(0.0, 1.0))[0]
        counts = unit_histogram(values, bins)
        np.testing.assert_array_equal(counts, expected)
        assert counts.dtype == expected.dtype


def test_unit_histogram_refuses_bins_it_cannot_place_exactly():
    with pytest.raises(ValueError, match="power-of-two number of bins, got 10"):
        unit_histogram(np.zeros(4), 10)
