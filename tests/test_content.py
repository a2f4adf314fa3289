"""Issue 13 §2: no label for what the model cannot judge; valid medical exports read by their real range.

Through a trained run, as a user's files: an X-ray PNG given to a CT model, photos, a screenshot and a
framed black picture get no probability and a ``wrong_content`` reason; a multi-page TIFF is refused like a
multi-frame DICOM; 12-bit PNGs and Hounsfield-unit TIFFs are read and predicted; an OOD content score far
above the run's threshold is a refusal. The shared-marked test measures false refusals on real images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidscan.errors import ImageReadError
from covidscan.inference import Predictor
from covidscan.io import assess, check_header, read_image
from covidscan.io.content import COLOUR_LIMIT, colour_fraction, content_model
from covidscan.models.ood import REFUSAL_FACTOR

REFUSED = ["cxr_png_for_ct", "photo_colour", "photo_gray", "screenshot", "framed_black"]
READ = ["png_12bit", "tiff_int16_hu", "tiff_int32_hu"]


@pytest.fixture(scope="module")
def predictions(tiny_run: Path, bad_inputs: dict) -> dict:
    cases = REFUSED + READ + ["tiff_multipage", "tiff_multipage_black_first", "png_16bit"]
    preds = Predictor.from_run(tiny_run).predict([bad_inputs[c].path for c in cases])
    return dict(zip(cases, preds, strict=True))


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_ct_model_cannot_judge_gets_no_label_and_a_reason(predictions, case):
    pred = predictions[case]
    assert pred.p_covid is None and pred.label is None and pred.uncertain is None
    assert "wrong_content" in pred.error and "refused image" in pred.error


def test_the_reason_says_what_the_picture_looks_like(predictions):
    assert "looks like a chest X-ray" in predictions["cxr_png_for_ct"].error
    assert "colour picture" in predictions["photo_colour"].error
    assert "neither a chest CT slice nor a chest X-ray" in predictions["framed_black"].error


def test_ct_png_given_to_an_xray_model_is_refused_and_the_dicom_tag_still_decides(bad_inputs):
    assert "wrong_content" in assess(read_image(bad_inputs["ct_png_for_cxr"].path), "cxr").codes
    ct_dicom = read_image(bad_inputs["dicom_ct"].path)
    assert assess(ct_dicom, "ct").ok and "wrong_modality" in assess(ct_dicom, "cxr").codes


@pytest.mark.parametrize("case", ["tiff_multipage", "tiff_multipage_black_first"])
def test_multipage_tiff_refused_like_multiframe_dicom(predictions, bad_inputs, case):
    pred = predictions[case]
    assert pred.p_covid is None and "multi-frame TIFF (2 pages)" in pred.error
    assert check_header(bad_inputs[case].path).frames == 2
    with pytest.raises(ImageReadError, match="save each page as its own image file"):
        read_image(bad_inputs[case].path)


@pytest.mark.parametrize("case", READ)
def test_twelve_bit_and_hounsfield_exports_are_read_and_predicted(predictions, bad_inputs, case):
    pred = predictions[case]
    assert pred.error is None and 0.0 <= pred.p_covid <= 1.0 and pred.label is not None, pred.error
    pixels = read_image(bad_inputs[case].path).pixels
    reference = read_image(bad_inputs["png_16bit"].path).pixels  # the same phantom, full 16-bit range
    assert np.abs(pixels - reference).max() < 2 / 255  # the same picture, not a blank one


def test_hounsfield_tiff_gets_the_ct_lung_window_like_dicom(bad_inputs):
    tiff = read_image(bad_inputs["tiff_int16_hu"].path).pixels
    dicom = read_image(bad_inputs["dicom_ct"].path).pixels
    np.testing.assert_allclose(tiff, dicom, atol=1e-6)


def test_signed_data_that_is_not_hounsfield_is_stretched(tmp_path):
    values = np.array([[-200, 0, 200]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "signed.tif")
    np.testing.assert_allclose(read_image(tmp_path / "signed.tif").pixels, [[0.0, 0.5, 1.0]])


def test_tinted_films_are_gray_and_photos_are_colour():
    gray = np.random.default_rng(0).random((64, 64))
    purple = np.stack([gray * 0.8, gray * 0.6, gray], axis=2)  # one hue: a tinted film
    assert colour_fraction(purple, 1.0) == 0.0
    rainbow = np.random.default_rng(1).random((64, 64, 3))
    assert colour_fraction(rainbow, 1.0) > COLOUR_LIMIT


def test_shipped_model_records_how_it_was_fitted():
    shipped = json.loads((Path(__file__).parents[1] / "src/covidscan/io/content_model.json").read_text())
    assert "measure_content.py" in shipped["command"]
    assert all(row["false_refusals"].startswith("0/") for name, row in shipped["measured"].items()
               if "false_refusals" in row)
    assert 0 < content_model().min_p <= 0.05


def test_ood_content_far_beyond_the_threshold_is_a_refusal_not_a_warning(ood_run):
    predictor = Predictor.from_run(ood_run)
    paths = _test_paths(ood_run)[:8]
    assert all(pred.error is None for pred in predictor.predict(paths))  # own test slices: never refused
    prepared = [predictor.prepare(read_image(path)) for path in paths]
    _, feats = predictor.logits_and_features(prepared)
    content = predictor.ood.score_parts(feats, np.stack([p.stats for p in prepared]))[:, 0]
    far = int(np.argmax(content))
    assert content[far] > 0
    # A run whose threshold sits well below that image's content score: it lies REFUSAL_FACTOR times beyond.
    predictor.ood.threshold_ = float(content[far]) / (2 * REFUSAL_FACTOR)
    preds = predictor.predict(paths)
    refused = preds[far]
    assert refused.p_covid is None and refused.label is None and refused.ood_score is not None
    assert "unlike_training_data" in refused.error and "cannot judge" in refused.error
    near = [pred for i, pred in enumerate(preds) if content[i] <= REFUSAL_FACTOR * predictor.ood.threshold_]
    assert all(pred.error is None and pred.p_covid is not None for pred in near)
    group = predictor.aggregate(preds, key=lambda pred: "all")
    assert group[0].n_images == len(preds) - sum(pred.error is not None for pred in preds)


def _test_paths(run: Path) -> list[str]:
    splits = pd.read_csv(run / "splits.csv")
    return splits.loc[splits["split"] == "test", "path"].tolist()


@pytest.mark.shared
def test_no_real_image_in_shared_is_refused_for_its_own_modality(shared_dir):
    data = shared_dir / "data"
    sets = {"ucsd-ct": "ct", "ct-ext-luna16": "ct", "cxr-dev": "cxr", "cxr-ext-figure1": "cxr"}
    files = [(path, kind) for name, kind in sets.items() for path in sorted((data / name).rglob("*.png"))]
    files += [(path, "cxr" if "cxr" in path.parent.name else "ct")
              for path in sorted((data / "raw-formats").rglob("*")) if path.is_file()]
    files += [(data / "dicom/CT_small.dcm", "ct"), (data / "dicom/RG1_J2KR.dcm", "cxr")]
    assert len(files) > 1800
    refused = [(path, report.refusals) for path, kind in files
               if not (report := assess(read_image(path), kind)).ok]
    assert refused == []
    xrays = [path for path, kind in files if kind == "cxr"][:200]
    assert sum("wrong_content" in assess(read_image(path), "ct").codes for path in xrays) > 100
