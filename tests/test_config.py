import json
import subprocess
import sys
from pathlib import Path

import pytest

from covidscan.config import list_presets, load_config
from covidscan.errors import ConfigError


def test_every_preset_validates():
    names = list_presets()
    assert {"paper-a-resnet50", "paper-a-bpnn", "paper-b-vgg19", "paper-b-mobilenet-aug"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.preprocess.modality == cfg.modality


def test_paper_a_preset_is_as_published():
    cfg = load_config("paper-a-resnet50")
    assert (cfg.model.backbone, cfg.model.head, cfg.model.train_mode) == ("resnet50", "paper_a", "frozen")
    assert cfg.preprocess.clahe and cfg.preprocess.lung_crop
    assert (cfg.train.epochs, cfg.train.augment) == (20, "paper_a")
    assert cfg.published["accuracy"] == pytest.approx(0.991)


def test_paper_b_preset_is_as_published():
    cfg = load_config("paper-b-vgg19-aug")
    assert (cfg.model.backbone, cfg.model.head) == ("vgg19", "paper_b")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.augment) == (
        1e-3,
        32,
        50,
        "paper_b",
    )
    assert load_config("paper-b-mobilenet").model.backbone == "timm:mobilenetv1_100"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("paper-a-resnet50", ["train.epochs=3", "data.ratios=[0.8, 0.2]", "train.augment=null"])
    assert cfg.train.epochs == 3
    assert cfg.data.ratios == (0.8, 0.2)
    assert cfg.train.augment is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs"),
        ("train.epocs=3", "epocs"),
        ("train.augment=paper_c", "train.augment"),
        ("no-equals-sign", "key.sub=value"),
    ],
)
def test_bad_overrides_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("paper-a-resnet50", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="paper-a-resnet50"):
        load_config("paper-z")


def test_config_file_round_trip(tmp_path: Path):
    from covidscan.config import dump_config

    cfg = load_config("paper-b-mobilenet", ["train.epochs=7"])
    path = dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg


def test_broken_yaml_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_modality_mismatch_is_rejected():
    with pytest.raises(ConfigError, match="modality"):
        load_config("paper-a-resnet50", ["preprocess.modality=cxr"])


def test_every_named_augmentation_can_be_set_from_a_preset():
    from covidscan.config import TrainConfig
    from covidscan.preprocess.transforms import AUGMENT_PRESETS

    allowed = set(TrainConfig.model_fields["augment"].annotation.__args__[0].__args__)
    assert allowed == set(AUGMENT_PRESETS)


HEAVY = ("torch", "torchvision", "timm", "cv2", "onnxruntime")
"""Libraries that take seconds to import: a light command or a wrong path must answer without them."""


def test_reading_presets_imports_no_deep_learning_library():
    """`covidscan presets` and every check of a preset answer in about a second: the model and preprocessing
    packages load torch, torchvision, timm and OpenCV only when a network or an image is needed."""
    code = ("import sys; from covidscan.cli import app; from covidscan.config import load_config; "
            f"load_config('covidscan-ct'); print(sorted(m for m in {HEAVY} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _command(argv: list[str], heavy: tuple[str, ...] = HEAVY) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``covidscan *argv`` in a fresh process: its result, and which of ``heavy`` it had loaded."""
    code = ("import atexit, json, sys; from covidscan.cli import main; "
            f"atexit.register(lambda: print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))); "
            f"sys.argv = {['covidscan', *argv]!r}; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return done, (json.loads(lines[-1]) if lines else None)


@pytest.mark.parametrize("command", [
    ["predict", "{missing}", "{tmp}", "--out", "{tmp}/p.csv"],
    ["evaluate", "{missing}", "--data", "{tmp}/m.csv", "--out", "{tmp}/e"],
    ["shift", "{missing}", "--data", "{tmp}"],
    ["export", "{missing}"],
    ["worker", "--data-dir", "{missing}"],
], ids=lambda command: command[0])
def test_a_missing_run_or_data_folder_is_named_before_any_model_library_loads(tmp_path: Path, command):
    missing = tmp_path / "no-run"
    # the service's file store reads images with OpenCV (tens of ms): only the model libraries stay out
    heavy = tuple(m for m in HEAVY if not (command[0] == "worker" and m == "cv2"))
    done, loaded = _command([a.format(missing=missing, tmp=tmp_path) for a in command], heavy)
    assert done.returncode == 2 and loaded == [], done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"{missing} does not exist" in said and "Traceback" not in said


def test_phantoms_are_written_without_any_model_library(tmp_path: Path):
    # every CSV and text file goes through covidscan.outputs, which must not pull in the model (5 s)
    argv = ["data", "synth", "--out", str(tmp_path / "p"), "--n", "2", "--slices-per-patient", "1"]
    done, loaded = _command(argv, tuple(m for m in HEAVY if m != "cv2"))  # OpenCV draws the phantoms
    assert done.returncode == 0 and loaded == [], done.stdout + done.stderr
    assert (tmp_path / "p" / "manifest.csv").is_file()


def test_the_lazy_packages_still_offer_every_name():
    """Each name the packages' stubs list loads its module on first use and is the module's own object."""
    import importlib

    for package in ("covidscan.models", "covidscan.preprocess"):
        module = importlib.import_module(package)
        assert len(module.__all__) > 20
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"
    from covidscan.models import ModelConfig
    from covidscan.models.config import ModelConfig as defined

    assert ModelConfig is defined
