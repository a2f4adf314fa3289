"""The quality gate (covidscan.io.quality): one test per rule, the bad-input corpus, bytes and uploads."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinputs import CASES, OUTCOMES, bomb_png, cropped_ct
from covidscan.data.synthetic import make_phantom
from covidscan.errors import (
    ConfigError,
    CovidscanError,
    ImageReadError,
    ImageRefusedError,
    InputError,
    ManifestError,
    WeightsNotFoundError,
)
from covidscan.io import (
    MAX_PIXELS_ENV,
    ImageMeta,
    LoadedImage,
    QualityLimits,
    assess,
    check_header,
    read_checked,
    read_image,
)
from dicom_files import write_dicom

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def image(pixels: np.ndarray, **meta: object) -> LoadedImage:
    """A decoded image as read_image returns it (PNG unless told otherwise)."""
    fields = {"path": Path("x.png"), "format": "PNG", "mode": "L", "original_size": pixels.shape,
              "modality": None, "patient_id": None, **meta}
    return LoadedImage(pixels=np.asarray(pixels, dtype=np.float32), meta=ImageMeta(**fields))  # type: ignore


def ct(size: int = 256) -> np.ndarray:
    return make_phantom(3, modality="ct", covid=False, size=size).image


def dicom(modality: str = "CT", body_part: str | None = None) -> LoadedImage:
    return image(ct(), format="DICOM", mode="MONOCHROME2", modality=modality or None, body_part=body_part)


def codes(entries: tuple[str, ...]) -> list[str]:
    return [e.split(":", 1)[0] for e in entries]


# ---------------------------------------------------------------- the corpus, whole


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_corpus_outcome(bad_inputs, case_id):
    case = bad_inputs[case_id]
    assert case.outcome in OUTCOMES and case.description
    try:
        loaded = read_image(case.path)
    except ImageRefusedError as err:
        assert case.outcome == "refused" and case.code in err.codes, err
        assert str(case.path) in str(err) and err.hint
        return
    except ImageReadError as err:
        assert case.outcome == "unreadable" and case.code in err.reason, err
        assert str(case.path) in str(err) and err.hint
        return
    assert case.outcome != "unreadable", f"{case_id} was read"
    report = assess(loaded, case.modality)
    assert all(";" not in entry for entry in report.refusals + report.warnings)
    if case.outcome == "refused":
        assert case.code in codes(report.refusals) and not report.ok, report
    elif case.outcome == "warned":
        assert report.ok and case.code in codes(report.warnings), report
    else:
        assert report.ok and not report.warnings, report


def test_corpus_ids_unique_and_every_outcome_present():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert {c.outcome for c in CASES} == set(OUTCOMES)


# ---------------------------------------------------------------- one test per rule


def test_tiny_refused_below_min_side_warned_below_small_side():
    limits = QualityLimits()
    assert codes(assess(image(np.random.default_rng(0).random((31, 60)))).refusals) == ["tiny"]
    small = assess(image(ct(100)))
    assert small.ok and codes(small.warnings) == ["tiny"] and "100x100" in small.warnings[0]
    assert assess(image(ct(limits.small_side))).warnings == ()


def test_elongated_refused_above_max_aspect_warned_above_warn_aspect():
    panels = np.tile(ct(200), (1, 6))  # CT slices side by side, as in paper figures
    strip = assess(image(panels[:, :1100]))
    assert codes(strip.refusals) == ["elongated"] and "5.5 times" in strip.refusals[0]
    wide = assess(image(panels[:, :700]), "ct")
    assert wide.ok and codes(wide.warnings) == ["elongated"]
    assert assess(image(panels[:, :590]), "ct").warnings == ()  # 2.95: side-by-side panels pass


def test_constant_and_blank_refused():
    black = assess(image(np.zeros((64, 64))))
    assert codes(black.refusals) == ["constant"] and "all black" in black.refusals[0]
    white = assess(image(np.ones((64, 64))))
    assert "all white" in white.refusals[0]
    near = 0.5 + np.random.default_rng(0).normal(0, 0.01, (64, 64))
    assert codes(assess(image(near)).refusals) == ["blank"]
    assert "blank" not in codes(assess(image(near), limits=QualityLimits(blank_std=0.005)).refusals)


def test_pixel_limit_from_header_argument_and_env(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray((ct(300) * 255).astype(np.uint8)).save(path)
    assert read_image(path).pixels.shape == (300, 300)
    with pytest.raises(ImageRefusedError, match="too_large: header declares 300x300") as info:
        read_image(path, limits=QualityLimits(max_pixels=300 * 300 - 1))
    assert info.value.codes == ("too_large",) and MAX_PIXELS_ENV in info.value.hint
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")
    with pytest.raises(ImageRefusedError, match=r"over the limit of 0\.1"):
        check_header(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match="COVIDSCAN_MAX_PIXELS='lots'"):
        read_image(path)


def test_dicom_pixel_limit_checked_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", np.zeros((64, 48), np.int16))
    header = check_header(path)
    assert (header.format, header.height, header.width, header.modality) == ("DICOM", 64, 48, "CT")
    for call in (read_image, check_header):
        with pytest.raises(ImageRefusedError, match="64x48"):
            call(path, limits=QualityLimits(max_pixels=1000))


def test_bomb_refused_from_header_without_allocating(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 40_000
    header = check_header(path, limits=QualityLimits(max_pixels=10**9))
    assert (header.height, header.width) == (12000, 12000)
    # A fresh process, so its peak memory is this read's alone: decoding would take >= 144 MB (1 byte per
    # pixel) before any float conversion.
    code = (
        "import resource, sys\n"
        "from covidscan.errors import ImageRefusedError\nfrom covidscan.io import read_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    read_image(sys.argv[1])\nexcept ImageRefusedError as e:\n    print(e.codes[0])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(path)], capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(REPO / "src")}).stdout.split()
    assert out[0] == "too_large"
    assert int(out[1]) < 20_000, f"peak memory grew by {int(out[1]) / 1024:.0f} MB reading the bomb"


@pytest.mark.parametrize(("tag", "model", "expected"), [
    ("CT", "ct", None), ("CT", None, None), ("DX", "cxr", None), ("CR", None, None),
    ("CT", "cxr", "wrong_modality"), ("DX", "ct", "wrong_modality"), ("MR", None, "wrong_modality"),
    ("US", "ct", "wrong_modality"), ("NM", "ct", "wrong_modality"), ("", "ct", "missing_modality"),
])
def test_dicom_modality_refusals(tag, model, expected):
    report = assess(dicom(tag), model)
    assert codes(report.refusals) == ([expected] if expected else [])
    if expected == "wrong_modality" and model:
        assert {"ct": "chest CT slices", "cxr": "chest X-rays"}[model] in report.refusals[0]


def test_doubtful_modality_warned_and_png_has_none():
    report = assess(dicom("OT"), "ct")
    assert report.ok and codes(report.warnings) == ["other_modality"]
    assert assess(image(ct()), "ct").ok  # ordinary image files carry no modality tag: their content is judged
    assert codes(assess(image(ct()), "cxr").refusals) == ["wrong_content"]


@pytest.mark.parametrize(("part", "refused", "warned"), [
    ("CHEST", False, False), ("Chest PA", False, False), ("CHESTABDOMEN", False, False),
    ("THORAX", False, False), (None, False, False), ("HEAD", True, False), ("KNEE", True, False),
    ("HEADNECK", True, False), ("L-SPINE", True, False), ("ABDOMEN", False, True), ("WHOLEBODY", False, True),
    ("HEART", False, True),
])
def test_body_part(part, refused, warned):
    report = assess(dicom("CT", part), "ct")
    assert ("body_part" in codes(report.refusals)) is refused
    assert ("body_part" in codes(report.warnings)) is warned


def test_inverted_not_fired_on_tightly_cropped_slice_but_on_inverted_ones():
    crop = cropped_ct()
    h, w = crop.shape
    corners = np.concatenate([crop[: h // 8, : w // 8], crop[-(h // 8):, -(w // 8):]], axis=None)
    # the misfire being fixed: this slice's corners are far brighter than its middle
    assert np.median(corners) - crop[h // 4 : -(h // 4), w // 4 : -(w // 4)].mean() > 0.35
    assert assess(image(crop), "ct").warnings == ()
    assert assess(image(ct()), "ct").warnings == ()
    for inverted in (1 - crop, 1 - ct()):
        report = assess(image(inverted), "ct")
        assert report.ok and codes(report.warnings) == ["inverted"]
    assert assess(image(1 - ct()), "cxr").warnings == ()  # a CT rule: X-rays have no such layout


def test_report_ok_codes_and_raise_if_refused():
    report = assess(image(np.zeros((8, 400))), "ct")
    assert not report.ok and report.codes == ("tiny", "elongated")
    with pytest.raises(ImageRefusedError) as info:
        report.raise_if_refused()
    assert info.value.codes == ("tiny", "elongated") and "x.png" in str(info.value)
    assert assess(image(ct()), "ct").raise_if_refused() is None


def test_bad_limits_and_modality_are_config_errors():
    with pytest.raises(ConfigError):
        QualityLimits(min_side=200, small_side=100)
    with pytest.raises(ConfigError):
        QualityLimits(min_side=4)
    with pytest.raises(ConfigError):
        QualityLimits(warn_aspect=6, max_aspect=5)
    with pytest.raises(ConfigError, match="modality='mri'"):
        assess(image(ct()), "mri")


def test_error_classes_and_http_status():
    assert issubclass(ImageReadError, InputError) and issubclass(ImageRefusedError, InputError)
    assert InputError.http_status == ImageReadError.http_status == ImageRefusedError.http_status == 422
    assert (ConfigError.http_status, ManifestError.http_status, WeightsNotFoundError.http_status) == (
        400, 400, 404)
    assert CovidscanError.http_status == 500
    err = ImageRefusedError("a.png", ["blank: nearly uniform", "tiny: 4x4 px"], "use another")
    assert str(err) == "refused image a.png: blank: nearly uniform; tiny: 4x4 px (use another)"
    assert err.codes == ("blank", "tiny") and err.reason == "blank: nearly uniform; tiny: 4x4 px"


# ---------------------------------------------------------------- bytes and file objects (uploads)


def test_png_bytes_and_file_object_read_like_the_path(tmp_path):
    path = tmp_path / "slice.png"
    Image.fromarray((ct() * 255).astype(np.uint8)).save(path)
    from_path = read_image(path)
    data = path.read_bytes()
    for source, name, expected in [(data, "upload.png", "upload.png"), (bytearray(data), None, "<bytes>"),
                                   (io.BytesIO(data), "u.png", "u.png")]:
        loaded = read_image(source, name=name)
        np.testing.assert_array_equal(loaded.pixels, from_path.pixels)
        assert loaded.meta.path == Path(expected) and loaded.meta.format == "PNG"
    with open(path, "rb") as f:
        assert read_image(f).meta.path == path  # an open file names itself
    assert check_header(data, name="u.png").height == 256


def test_dicom_bytes_and_file_object(tmp_path):
    stored = np.arange(12, dtype=np.int16).reshape(3, 4) * 100 - 1000
    path = write_dicom(tmp_path / "ct.dcm", stored, BodyPartExamined="CHEST")
    from_path = read_image(path)
    for source in (path.read_bytes(), io.BytesIO(path.read_bytes())):
        loaded = read_image(source, name="scan")  # no .dcm suffix: found by its DICM marker
        np.testing.assert_array_equal(loaded.pixels, from_path.pixels)
        assert (loaded.meta.format, loaded.meta.modality, loaded.meta.body_part) == ("DICOM", "CT", "CHEST")
        assert loaded.meta.path == Path("scan")
    header = check_header(path.read_bytes(), name="scan")
    assert (header.height, header.width, header.body_part) == (3, 4, "CHEST")


def test_bad_uploads_name_the_upload(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray((ct() * 255).astype(np.uint8)).save(buffer, format="PNG")
    broken_png = buffer.getvalue()[:2000]
    for source, reason in [(b"", "empty"), (b"%PDF-1.4 fake" * 5, "PDF document"),
                           (io.StringIO("text"), "text mode"), (broken_png, "truncated")]:
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(source, name="upload-7.png")
        assert "upload-7.png" in str(info.value) and info.value.hint
    with pytest.raises(ImageReadError, match="cannot read a int"):
        read_image(42)  # type: ignore[arg-type]
    with pytest.raises(ImageRefusedError, match="too_large"):
        read_image(bomb_png(), name="bomb.png")


def test_read_checked_refuses_what_the_corpus_refuses(bad_inputs):
    for case in bad_inputs.values():
        if case.outcome == "unreadable":
            continue
        if case.outcome == "refused":
            with pytest.raises(ImageRefusedError) as info:
                read_checked(case.path, case.modality)
            assert case.code in info.value.codes, case.id
        else:
            _, report = read_checked(case.path, case.modality)
            assert (case.code in report.codes) if case.outcome == "warned" else not report.codes, case.id


# ---------------------------------------------------------------- real CT slices from ../shared

# ucsd-ct figures on which the old corner rule fired: cropped to the chest, tissue or page in the corners.
UCSD_CROPPED = ["covid/2020.02.22.20024927-p20-70%0.png", "covid/2020.03.04.20030395-p27-108%3.png",
                "covid/2020.03.07.20031393-p7-50%2.png", "covid/2020.03.16.20035105-p6-64-1.png",
                "covid/kjr-21-e25-p1-6.png", "non_covid/14%1.png", "non_covid/15%0.png"]


@pytest.mark.shared
def test_real_cropped_and_uncropped_ct_not_inverted_but_their_inverted_copies_are(shared_dir):
    data = shared_dir / "data"
    files = [data / "ucsd-ct" / name for name in UCSD_CROPPED]
    files += sorted((data / "ct-ext-luna16" / "non_covid").glob("*.png"))[::20]  # uncropped slices
    for path in files:
        loaded = read_image(path)
        assert "inverted" not in assess(loaded, "ct").codes, path
        flipped = LoadedImage(pixels=1 - loaded.pixels, meta=loaded.meta)
        assert "inverted" in assess(flipped, "ct").codes, path
