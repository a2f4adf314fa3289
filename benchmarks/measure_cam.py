"""Where do the models look? Grad-CAM localisation on phantoms (known lesions) and on real CT test images.

(b) phantoms: trains paper A's model with a MobileNetV2 base on CT phantoms, then scores the CAMs of the
    covid images of its test split against the phantoms' lesion masks: pointing-game hit rate (strict and
    with a tolerance) and IoU of the CAM region with the lesion; CAM energy in the true lung mask.
(a) real: the share of CAM energy inside the lungs (covidscan.preprocess.find_lungs on the original image,
    as real images have no lung masks) for a trained run's test split, by class.

Each figure comes with what a CAM without information would score ("chance"): a uniform CAM over the crop
the model saw, or a random point in it.

    python benchmarks/measure_cam.py --weights ../shared/weights/mobilenet_v2_imagenet_coral_dequant.pth \\
        --run runs/real/paper-a/paper-a-resnet50/patient
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from covidscan.config import load_config
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.explain import cam_metrics, cam_to_original, gradcam
from covidscan.inference import Predictor
from covidscan.io import read_image
from covidscan.preprocess import PreparedImage, find_lungs
from covidscan.training import train_experiment


def prepare(predictor: Predictor, paths: list[str]) -> list[PreparedImage]:
    """The images as the run sees them, with their originals kept."""
    return [predictor.prepare(read_image(p), keep_original=True) for p in paths]


def batches(predictor: Predictor, prepared: list[PreparedImage], batch_size: int):
    """(slice, normalised batch) pairs over ``prepared``."""
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start : start + batch_size]
        yield slice(start, start + len(chunk)), predictor.batch(chunk).contiguous()


def crop_share(mask: np.ndarray, bbox: tuple[int, int, int, int]) -> float:
    """Share of the crop box covered by ``mask``: what a uniform CAM over the crop puts inside it."""
    y0, x0, y1, x1 = bbox
    return float(mask[y0:y1, x0:x1].mean())


def mask(path: Path) -> np.ndarray:
    """A 0/255 mask PNG as booleans."""
    return read_image(path).pixels > 0.5


def phantom_part(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str]]:
    """Train on phantoms, then score the test split's covid CAMs against the lesion masks."""
    manifest = write_phantom_dataset(work / "data", n=args.phantoms, modality="ct", seed=args.seed)
    # A larger test share (30 %) gives more covid test images to score; 2 cached views instead of 5 and
    # few bootstrap rounds keep the script within a few minutes on a laptop CPU.
    cfg = load_config("paper-a-resnet50", [
        "model.backbone=mobilenet_v2", f"model.weights={args.weights}", f"train.epochs={args.epochs}",
        "train.views=2", "data.ratios=[0.6,0.1,0.3]", "evaluation.n_bootstrap=100",
    ])
    trained = train_experiment(cfg, manifest, work / "run", progress=False)
    run = Predictor.from_run(trained.run_dir)
    splits = pd.read_csv(run.run_dir / "splits.csv")
    rows = splits[(splits["split"] == "test") & (splits["label"] == "covid")]
    lungs = [mask(manifest.parent / p) for p in rows["lung_mask"]]
    lesions = [mask(manifest.parent / p) for p in rows["lesion_mask"]]
    prepared = prepare(run, rows["path"].tolist())
    scores: list[dict] = []
    for part, batch in batches(run, prepared, args.batch_size):
        for i, cam in zip(range(part.start, part.stop), gradcam(run.model, batch), strict=True):
            full = cam_to_original(cam, prepared[i].bbox, prepared[i].original.shape)
            strict = cam_metrics(full, lungs[i], lesions[i], threshold=args.threshold)
            loose = cam_metrics(full, lesion_mask=lesions[i], tolerance=args.tolerance)
            scores.append({**strict, "hit_tol": loose["pointing_game_hit"],
                           "chance_hit": crop_share(lesions[i], prepared[i].bbox),
                           "chance_energy": crop_share(lungs[i], prepared[i].bbox)})
    df = pd.DataFrame(scores)
    n = f"{len(df)} covid test phantoms"
    chance_hit = f"chance {df['chance_hit'].mean():.3f}; {n}"
    quality = {k: trained.metrics["metrics"][k]["value"] for k in ("accuracy", "roc_auc")}
    return [
        ("phantom model (test split)", "accuracy {accuracy:.3f}, ROC AUC {roc_auc:.3f}".format(**quality),
         f"{len(splits)} phantoms"),
        ("pointing game, strict", rate(df["pointing_game_hit"]), chance_hit),
        (f"pointing game, {args.tolerance} px tolerance", rate(df["hit_tol"]), n),
        (f"IoU(CAM region >= {args.threshold} max, lesion)", mean_median(df["iou"]), n),
        ("CAM energy in true lung mask", mean_median(df["energy_in_lungs"]),
         f"uniform-CAM {df['chance_energy'].mean():.3f}"),
    ]


def real_part(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Share of CAM energy inside find_lungs' lung mask on the run's test split, overall and by class."""
    run = Predictor.from_run(args.run)
    test = pd.read_csv(run.run_dir / "splits.csv").query("split == 'test'").reset_index(drop=True)
    prepared = prepare(run, test["path"].tolist())
    found = [find_lungs(p.original, modality=run.modality) for p in prepared]
    lungs = [f.mask if f.found else None for f in found]
    results: list[dict] = []
    for start in range(0, len(prepared), args.batch_size):
        part = slice(start, start + args.batch_size)
        results += run.explain(prepared[part], lung_masks=lungs[part], threshold=args.threshold)
    energy = pd.Series([r["cam_energy_in_lungs"] for r in results], dtype=float)
    uniform = pd.Series(
        [np.nan if m is None else crop_share(m, p.bbox) for m, p in zip(lungs, prepared, strict=True)]
    )
    table = [("real run", str(run.run_dir), f"{len(test)} test images")]
    for name, keep in [("all", slice(None)), *((c, test["label"] == c) for c in ("covid", "non_covid"))]:
        values = energy[keep]
        note = f"uniform-CAM {uniform[keep].mean():.3f}; n={values.notna().sum()}"
        if values.isna().any():
            note += f", {values.isna().sum()} without lungs found or with a zero CAM"
        table.append((f"CAM energy in lungs, {name}", mean_median(values), note))
    return table


def rate(hits: pd.Series) -> str:
    hits = hits.dropna().astype(bool)
    return f"{hits.mean():.3f} ({hits.sum()}/{len(hits)})"


def mean_median(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    return f"mean {values.mean():.3f}, median {values.median():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="MobileNetV2 state_dict for the phantoms")
    parser.add_argument("--run", type=Path, help="trained run on real CT (else phantoms only)")
    parser.add_argument("--phantoms", type=int, default=200, help="CT phantoms to train on (0: none)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="phantom dataset seed")
    parser.add_argument("--threshold", type=float, default=0.5, help="CAM region: >= threshold * max")
    parser.add_argument("--tolerance", type=int, default=15, help="pointing-game tolerance in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.phantoms and args.weights is None:
        parser.error("--weights is needed for the phantom part (or --phantoms 0 with --run)")

    table: list[tuple[str, str, str]] = []
    start = time.perf_counter()
    if args.phantoms:
        with tempfile.TemporaryDirectory() as work:
            table += phantom_part(args, Path(work))
    phantom_s = time.perf_counter() - start
    if args.run is not None:
        table += real_part(args)
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"time: phantoms {phantom_s:.0f} s, total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
