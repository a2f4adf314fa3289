"""covidscan's own recommended presets, beside the papers': they validate and train end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from covidscan.config import load_config
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import ConfigError
from covidscan.inference import Predictor
from covidscan.preprocess.lungseg import LungSegmenter, UNet
from covidscan.runs import file_sha256
from covidscan.training import train_experiment

TINY = ["model.backbone=timm:resnet18", "model.weights=none", "model.input_size=64", "train.epochs=1",
        "train.views=1", "evaluation.n_bootstrap=20"]


def test_the_recommended_presets_are_what_the_readme_says():
    ct, cxr = load_config("covidscan-ct"), load_config("covidscan-cxr")
    for cfg in (ct, cxr):  # chosen by covidscan tune
        assert (cfg.model.backbone, cfg.model.dropout, cfg.train.epochs) == ("mobilenet_v2", 0.6, 50)
        assert cfg.model.train_mode == "frozen"
        assert cfg.preprocess.normalize == "percentile" and cfg.train.augment == "strong"
        assert cfg.data.split_by == "patient"
    assert (ct.modality, ct.preprocess.mask_outside_lungs) == ("ct", False)
    assert (cxr.modality, cxr.preprocess.mask_outside_lungs) == ("cxr", True)
    assert cxr.preprocess.max_pixels == 65536
    astra = load_config("covidscan-ct-astra")  # chosen by covidscan tune; averaged with covidscan-ct runs
    assert astra.preprocess == ct.preprocess and astra.data == ct.data  # `covidscan ensemble` needs both
    assert (astra.model.backbone, astra.model.standardize, astra.train.lr, astra.train.augment) == (
        "astra_ct", True, 1e-4, None)
    assert ct.model.input_hw == (448, 448)  # chosen among 224 / 320 / 448 / 576 / 704 by cross-validation
    assert astra.model.input_hw == (320, 320)  # chosen among 224 / 320 / 448 by the same cross-validation


def test_covidscan_ct_trains_end_to_end(tmp_path, phantom_manifest):
    result = train_experiment(load_config("covidscan-ct", TINY), phantom_manifest, tmp_path / "run",
                              progress=False)
    checkpoint = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert checkpoint["preprocess"]["normalize"] == "percentile"
    assert (result.run_dir / "model_card.md").is_file()


@pytest.fixture(scope="module")
def xrays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("cxr"), n=40, modality="cxr", seed=2,
                                 slices_per_patient=1)


def test_covidscan_cxr_needs_the_lung_model_and_says_how_to_make_it(tmp_path, xrays, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="covidscan lungseg train"):
        train_experiment(load_config("covidscan-cxr", TINY), xrays, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_covidscan_cxr_trains_with_a_lung_model(tmp_path, xrays):
    # A U-Net file that calls the central region lung: every image keeps its middle, loses its borders.
    model = UNet()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(10.0)
    lungs = LungSegmenter(model, 64).save(tmp_path / "lungs.safetensors")
    cfg = load_config("covidscan-cxr", [*TINY, f"preprocess.lung_model={lungs}"])
    result = train_experiment(cfg, xrays, tmp_path / "run", progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["n_images"] > 0 and metrics["metrics"]["roc_auc"]["value"] is not None
    checkpoint = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert checkpoint["preprocess"]["mask_outside_lungs"]
    assert checkpoint["preprocess"]["lung_model"] == str(lungs)
    assert checkpoint["lung_model_sha256"] == file_sha256(lungs)
    Predictor.from_run(result.run_dir)  # the same lung model: serves
    with torch.no_grad():
        model.head.bias.fill_(-10.0)
    LungSegmenter(model, 64).save(lungs)  # another lung model at the same path: refused, not silently used
    with pytest.raises(ConfigError, match="another lung model than the run was trained with"):
        Predictor.from_run(result.run_dir)


def test_a_masked_run_says_when_it_could_not_mask(tiny_run, tmp_path):
    import numpy as np
    from PIL import Image

    predictor = Predictor.from_run(tiny_run)
    masked = predictor.checkpoint.preprocess.model_copy(update={"mask_outside_lungs": True})
    predictor.checkpoint = predictor.checkpoint.model_copy(update={"preprocess": masked})
    from covidscan.data.synthetic import make_phantom

    phantom = make_phantom(0, modality="ct", covid=False, size=128)
    body = phantom.image.copy()
    lungs = phantom.lung_mask.astype(bool)
    body[lungs] = np.median(body[(body > 0.3) & ~lungs])  # a CT slice whose lungs are filled with tissue
    Image.fromarray(np.rint(body * 255).astype(np.uint8)).save(tmp_path / "no-lungs.png")
    prepared = predictor.prepare(predictor.load(tmp_path / "no-lungs.png"))
    assert prepared.lungs_found is False
    assert any(w.startswith("unmasked:") for w in prepared.warnings)
    assert any(w.startswith("no_lungs:") for w in prepared.warnings)
