"""Would a model that may only look at the lungs be as good? Feature averaging over the whole crop against
averaging over the lungs alone, under the same linear head, on a trained run's frozen backbone.

A pooled head (paper A's, the linear one) averages the backbone's feature map over the whole lung crop, so
the chest wall, the mediastinum and the spine count as much as the lungs; its Grad-CAM on ucsd-ct puts no
more energy in the lungs than a uniform map. Averaging with the lung mask's weights instead (each feature
cell weighted by the share of it inside the mask the lung crop found) makes the lungs the only place the
head reads from; the receptive fields still see around them.

For each pooling, on the run's own rows and splits:

* fold ROC AUC: patient-grouped k-fold cross-validation on train + validation (``covidscan tune``'s folds),
  logistic regression on standardised pooled features (C chosen by ``--C``);
* test ROC AUC: the same head fitted on train + validation, scored once on the test split;
* CAM energy in the lungs on the test split: for a linear head on averaged features the CAM of the covid
  logit is exact, ``ReLU(sum_k w_k * weight(x, y) * A_k(x, y))`` (HiResCAM; for whole-crop averaging the
  weight is constant, so it is also Grad-CAM), scored as ``benchmarks/measure_cam.py`` scores a run;
* with ``--external``, the share of an external non-COVID set the head calls non-COVID (p < 0.5).

    python benchmarks/measure_lung_pooling.py --run runs/covidscan-ct \\
        --external ../shared/data/ct-ext-luna16/labels.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from covidscan.data import read_manifest
from covidscan.explain import cam_metrics, cam_to_original
from covidscan.inference import Predictor
from covidscan.io import read_image
from covidscan.training.tune import make_folds


class Maps:
    """Backbone feature maps of some images, with each feature cell's share inside the lungs."""

    def __init__(self, run: Predictor, paths: list[str], batch_size: int) -> None:
        maps, weights, self.lungs, self.boxes, self.shapes = [], [], [], [], []
        start = time.perf_counter()
        for first in range(0, len(paths), batch_size):
            prepared = [
                run.prepare(read_image(p), keep_original=True) for p in paths[first : first + batch_size]
            ]
            with torch.inference_mode():
                fmap = run.model.backbone(run.batch(prepared).contiguous()).float()
            maps.append(fmap.half())
            for item in prepared:
                y0, x0, y1, x1 = item.bbox
                # no lungs found: every cell counts, as in whole-crop averaging
                lungs = item.lung_mask
                inside = np.ones((y1 - y0, x1 - x0), bool) if lungs is None else lungs[y0:y1, x0:x1]
                cells = F.adaptive_avg_pool2d(
                    torch.from_numpy(inside.astype(np.float32))[None, None], fmap.shape[-2:]
                )
                weights.append(cells[0, 0])
                self.lungs.append(lungs)
                self.boxes.append(item.bbox)
                self.shapes.append(item.original.shape)
            print(
                f"  {first + len(prepared)}/{len(paths)} images, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        self.maps = torch.cat(maps)
        self.weights = torch.stack(weights)

    def cell_weights(self, pooling: str) -> torch.Tensor:
        """(N, H, W) averaging weights, summing to 1 per image."""
        w = torch.ones_like(self.weights) if pooling == "crop" else self.weights
        return w / w.sum((1, 2), keepdim=True).clamp_min(1e-6)

    def pooled(self, pooling: str) -> np.ndarray:
        return torch.einsum("nkhw,nhw->nk", self.maps.float(), self.cell_weights(pooling)).numpy()

    def cam_energy(self, pooling: str, head: Pipeline, rows: np.ndarray) -> float:
        """Mean share of the covid logit's exact CAM inside the lungs, over ``rows`` with lungs found."""
        scaler, logistic = head[0], head[-1]
        w = torch.from_numpy(logistic.coef_[0] / scaler.scale_).float()
        cells = self.cell_weights(pooling)
        shares = []
        for i in rows:
            lungs = self.lungs[i]
            cam = F.relu(torch.einsum("k,khw->hw", w, self.maps[i].float()) * cells[i])
            if lungs is None or cam.max() <= 0:
                continue
            full = cam_to_original((cam / cam.max()).numpy(), self.boxes[i], self.shapes[i])
            shares.append(cam_metrics(full, lungs)["energy_in_lungs"])
        return float(np.mean(shares))


def fit_head(x: np.ndarray, y: np.ndarray, c: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="a trained CT run (its backbone, preprocessing, splits)"
    )
    parser.add_argument("--external", type=Path, help="labels CSV of an external non-COVID set (specificity)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold seed")
    parser.add_argument("--C", type=float, default=0.01, help="inverse L2 strength of the logistic head")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    run = Predictor.from_run(args.run)
    rows = pd.read_csv(args.run / "splits.csv")
    y = (rows["label"] == "covid").to_numpy().astype(int)
    groups = rows["patient_id"].fillna(rows["path"]).to_numpy()
    seen = np.flatnonzero(rows["split"] != "test")
    test = np.flatnonzero(rows["split"] == "test")
    print(f"{args.run}: {len(seen)} train + validation rows, {len(test)} test rows")
    maps = Maps(run, rows["path"].tolist(), args.batch_size)
    external = None
    if args.external:
        ext = read_manifest(args.external)
        print(f"{args.external}: {len(ext)} rows")
        external = Maps(run, ext["path"].tolist(), args.batch_size)

    folds = make_folds(y[seen], groups[seen], args.folds, args.seed)
    # a uniform map over the crop puts the lungs' share of the crop in them
    boxed = [(maps.lungs[i], maps.boxes[i]) for i in test if maps.lungs[i] is not None]
    uniform = [float(m[y0:y1, x0:x1].mean()) for m, (y0, x0, y1, x1) in boxed]
    print(f"\nCAM energy in the lungs of a uniform map over the crop: {np.mean(uniform):.3f} (test)")
    print(
        "pooling | fold ROC AUC, mean (min-max) | test ROC AUC | CAM energy in the lungs (test) | "
        "external specificity"
    )
    for pooling in ("crop", "lungs"):
        x = maps.pooled(pooling)
        aucs = []
        for fold in folds:
            train = seen[np.concatenate([fold.fit, fold.val])]
            held = seen[fold.test]
            aucs.append(
                roc_auc_score(y[held], fit_head(x[train], y[train], args.C).decision_function(x[held]))
            )
        head = fit_head(x[seen], y[seen], args.C)
        test_auc = roc_auc_score(y[test], head.decision_function(x[test]))
        spec = "" if external is None else f"{np.mean(head.predict(external.pooled(pooling)) == 0):.3f}"
        print(
            f"{pooling} | {np.mean(aucs):.3f} ({min(aucs):.3f}-{max(aucs):.3f}) | {test_auc:.3f} | "
            f"{maps.cam_energy(pooling, head, test):.3f} | {spec}",
            flush=True,
        )


if __name__ == "__main__":
    main()
