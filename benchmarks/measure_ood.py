"""Issue 9 §1: which out-of-distribution score tells "unlike the training data" apart, measured on ../shared.

    nice python benchmarks/measure_ood.py                   # features cached under /tmp, then the table
    nice python benchmarks/measure_ood.py --cache /tmp/ood --phantoms 200

Features come from the offline MobileNetV2 ImageNet weights (the paper-A stand-in), with paper A's
preprocessing for CT (CLAHE + lung crop) and CLAHE alone for X-rays. Every image is fed through the
pipeline of the model being protected: a chest X-ray given to the CT model gets the CT lung crop. Each
score is fitted on the in-distribution train split, its threshold is the 95th percentile on validation,
and it is measured by AUROC (in-distribution test images against each other set) and the share flagged.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

from covidscan.data import read_manifest, split_manifest
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.io import read_image
from covidscan.io.stats import HIST_BINS, image_stats
from covidscan.models import build_backbone
from covidscan.models.ood import FeatureDensity, ImageStatsEnvelope, OODDetector
from covidscan.preprocess import PreprocessConfig, eval_transform, prepare_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = "weights/mobilenet_v2_imagenet_coral_dequant.pth"
SIZE = (224, 224)
# MobileNetV2 stages whose feature maps give the multi-layer statistics (24, 32, 64, 96, 160 channels).
MID_STAGES = (3, 6, 10, 13, 16)
PIPELINES = {
    "ct": PreprocessConfig(clahe=True, lung_crop=True, modality="ct"),
    "cxr": PreprocessConfig(clahe=True, lung_crop=False, modality="cxr"),
}


# ------------------------------------------------------------------------------------------ features
class Extractor:
    """MobileNetV2 pooled features, multi-layer channel mean/std, and pooled features of the flipped view."""

    def __init__(self, weights: Path) -> None:
        self.backbone = build_backbone("mobilenet_v2", str(weights), SIZE).eval()
        self.transform = eval_transform(SIZE, self.backbone.mean, self.backbone.std)
        self._maps: dict[int, torch.Tensor] = {}
        for i in MID_STAGES:
            self.backbone.body.get_submodule(str(i)).register_forward_hook(self._keep(i))

    def _keep(self, i: int):
        def hook(_module, _inputs, output):
            self._maps[i] = output

        return hook

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        pooled = self.backbone(batch).mean(dim=(2, 3))
        multi = torch.cat([torch.cat([m.mean(dim=(2, 3)), m.std(dim=(2, 3))], 1)
                           for m in (self._maps[i] for i in MID_STAGES)], 1)
        flipped = self.backbone(batch.flip(-1)).mean(dim=(2, 3))
        return {"pooled": pooled.numpy(), "multi": multi.numpy(), "flip": flipped.numpy()}


def load_one(path: str, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    loaded = read_image(path)
    return prepare_image(loaded, cfg, SIZE).pixels, image_stats(loaded.pixels, loaded.meta)


def extract(extractor: Extractor, paths: list[str], pipeline: str, cache: Path) -> dict[str, np.ndarray]:
    """Features and image statistics of ``paths`` under a pipeline, cached in ``cache`` (npz)."""
    if cache.is_file():
        cached = dict(np.load(cache))
        if len(cached["stats"]) == len(paths):  # else the set changed (e.g. --phantoms): extract again
            return cached
    cfg = PIPELINES[pipeline]
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda p: load_one(p, cfg), paths))
    parts: dict[str, list[np.ndarray]] = {"pooled": [], "multi": [], "flip": []}
    for start in range(0, len(paths), 32):
        chunk = loaded[start:start + 32]
        batch = torch.stack([extractor.transform(px) for px, _ in chunk])
        for key, value in extractor(batch).items():
            parts[key].append(value)
    out = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    out["stats"] = np.stack([s for _, s in loaded])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


# ------------------------------------------------------------------------------------------ scores
# A score is fitted once: score(fit, val) returns a function that scores any set (higher = more unusual).
Scorer = Callable[[dict], np.ndarray]
Score = Callable[[dict, dict], Scorer]
INTENSITY = list(range(HIST_BINS + 4))  # histogram, mean, std, near-black and near-white shares
SIZE_COLS = [HIST_BINS + 4, HIST_BINS + 5, HIST_BINS + 6]  # log height, log width, log aspect


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def density(key: str, method: str, *, labelled: bool = True, **kw) -> Score:
    def fit_score(fit: dict, _val: dict) -> Scorer:
        model = FeatureDensity(method, **kw).fit(fit[key], fit["labels"] if labelled else None)
        return lambda data: model.score(data[key])

    return fit_score


def grouped_mahalanobis(groups: str, clusters: int = 8) -> Score:
    """Mahalanobis to the nearest of several means: per source (where known), or per k-means cluster."""

    def fit_score(fit: dict, _val: dict) -> Scorer:
        x = fit["pooled"]
        labels = fit[groups] if groups in fit else KMeans(clusters, n_init=4, random_state=0).fit_predict(x)
        model = FeatureDensity("mahalanobis").fit(x, labels)
        return lambda data: model.score(data["pooled"])

    return fit_score


def pca_residual(n: int) -> Score:
    def fit_score(fit: dict, _val: dict) -> Scorer:
        x = fit["pooled"].astype(np.float64)
        centre = x.mean(0)
        basis = np.linalg.svd(x - centre, full_matrices=False)[2][:n]

        def scorer(data: dict) -> np.ndarray:
            y = data["pooled"] - centre
            return np.linalg.norm(y - (y @ basis.T) @ basis, axis=1) / np.linalg.norm(y, axis=1)

        return scorer

    return fit_score


def envelope(fit: dict, _val: dict) -> Scorer:
    """The library's ImageStatsEnvelope: an isolation forest on standardised image statistics."""
    model = ImageStatsEnvelope().fit(fit["stats"])
    return lambda data: model.score(data["stats"])


def _standardise(fit: dict, cols: slice | list[int]) -> Callable[[dict], np.ndarray]:
    x = fit["stats"][:, cols]
    centre, scale = x.mean(0), np.maximum(x.std(0), 1e-3)
    return lambda data: (data["stats"][:, cols] - centre) / scale


def stats_density(method: str, cols: slice | list[int] = slice(None)) -> Score:
    """Other envelopes: Mahalanobis (Ledoit-Wolf), k-NN (Euclidean, k=5) or a diagonal Gaussian."""

    def fit_score(fit: dict, _val: dict) -> Scorer:
        z = _standardise(fit, cols)
        if method == "diagonal":
            return lambda data: (z(data) ** 2).mean(1)
        if method == "knn":
            train = z(fit)
            return lambda data: np.sort(((z(data)[:, None] - train[None]) ** 2).sum(-1), 1)[:, 4] ** 0.5
        model = FeatureDensity("mahalanobis").fit(z(fit))
        return lambda data: model.score(z(data))

    return fit_score


def forest_on(cols: slice | list[int]) -> Score:
    """An isolation forest on some of the statistics only."""

    def fit_score(fit: dict, _val: dict) -> Scorer:
        z = _standardise(fit, cols)
        forest = IsolationForest(n_estimators=200, random_state=0).fit(z(fit))
        return lambda data: -forest.score_samples(z(data))

    return fit_score


def _head(fit: dict) -> MLPClassifier:
    # The paper-A head's shape (one hidden ReLU layer of 256) on standardised pooled features.
    head = MLPClassifier((256,), alpha=1e-3, max_iter=300, random_state=0)
    return head.fit(fit["pooled"] / fit["scale"], fit["labels"])


def adapted_mahalanobis(fit: dict, _val: dict) -> Scorer:
    """Mahalanobis on the hidden layer of a head trained on the task ("features after adaptation")."""
    head = _head(fit)

    def hidden(x: np.ndarray) -> np.ndarray:
        return np.maximum(x / fit["scale"] @ head.coefs_[0] + head.intercepts_[0], 0.0)

    model = FeatureDensity("mahalanobis").fit(hidden(fit["pooled"]), fit["labels"])
    return lambda data: model.score(hidden(data["pooled"]))


def head_uncertainty(fit: dict, _val: dict) -> Scorer:
    """1 - max softmax probability of the trained head (the classic baseline)."""
    head = _head(fit)
    return lambda data: 1.0 - head.predict_proba(data["pooled"] / fit["scale"]).max(1)


def _logistic(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    return LogisticRegression(C=0.1, max_iter=2000).fit(x, y)


def ensemble_disagreement(fit: dict, _val: dict) -> Scorer:
    """Std of p_covid over 5 logistic heads, each fitted on a bootstrap sample of training patients."""
    rng = np.random.default_rng(0)
    patients = np.unique(fit["patients"])
    heads = []
    for _ in range(5):
        chosen = rng.choice(patients, len(patients))
        idx = np.concatenate([np.flatnonzero(fit["patients"] == p) for p in chosen])
        heads.append(_logistic(fit["pooled"][idx] / fit["scale"], fit["labels"][idx]))
    return lambda data: np.std([h.predict_proba(data["pooled"] / fit["scale"])[:, 1] for h in heads], axis=0)


def flip_disagreement(fit: dict, _val: dict) -> Scorer:
    """|p(image) - p(mirrored image)| of a logistic head: augmented views that disagree."""
    head = _logistic(fit["pooled"] / fit["scale"], fit["labels"])

    def scorer(data: dict) -> np.ndarray:
        p = [head.predict_proba(data[key] / fit["scale"])[:, 1] for key in ("pooled", "flip")]
        return np.abs(p[0] - p[1])

    return scorer


def flip_feature_distance(_fit: dict, _val: dict) -> Scorer:
    return lambda data: 1.0 - (_unit(data["pooled"]) * _unit(data["flip"])).sum(1)


def combined(*parts: Score) -> Score:
    """Max of the parts, each scaled so that its validation median is 0 and its validation q95 is 1."""

    def fit_score(fit: dict, val: dict) -> Scorer:
        scorers, scales = [], []
        for part in parts:
            scorer = part(fit, val)
            v = scorer(val)
            median = np.median(v)
            scorers.append(scorer)
            scales.append((median, max(np.quantile(v, 0.95) - median, 1e-12)))
        return lambda data: np.max([(f(data) - m) / w for f, (m, w) in zip(scorers, scales, strict=True)], 0)

    return fit_score


def detector(fit: dict, val: dict) -> Scorer:
    """The library's OODDetector with its defaults (what the lead wires in)."""
    ood = OODDetector().fit(fit["pooled"], fit["labels"], fit["stats"], val["pooled"], val["stats"])
    return lambda data: ood.score(data["pooled"], data["stats"])


SINGLE: dict[str, Score] = {
    "(a) Mahalanobis, pooled, class-conditional": density("pooled", "mahalanobis"),
    "(a') Mahalanobis, pooled, one Gaussian": density("pooled", "mahalanobis", labelled=False),
    "(b) k-NN cosine, pooled, k=5": density("pooled", "knn", k=5),
    "(b) k-NN cosine, pooled, k=10": density("pooled", "knn", k=10),
    "(c) Mahalanobis after PCA 16": density("pooled", "mahalanobis", n_components=16),
    "(c) Mahalanobis after PCA 64": density("pooled", "mahalanobis", n_components=64),
    "(c') PCA-64 residual (share of norm)": pca_residual(64),
    "(d) envelope, Mahalanobis (Ledoit-Wolf)": stats_density("mahalanobis"),
    "(d) envelope, diagonal Gaussian": stats_density("diagonal"),
    "(d) envelope, k-NN (standardised, k=5)": stats_density("knn"),
    "(d) envelope, IsolationForest = ImageStatsEnvelope": envelope,
    "(d') IsolationForest, intensity only (no size/format)": forest_on(INTENSITY),
    "(d') IsolationForest, size/aspect only": forest_on(SIZE_COLS),
    "(e) Mahalanobis, multi-layer mean/std": density("multi", "mahalanobis"),
    "(e) k-NN cosine, multi-layer mean/std, k=5": density("multi", "knn", k=5),
    "per-source Mahalanobis": grouped_mahalanobis("sources"),
    "per-cluster Mahalanobis (k-means 8)": grouped_mahalanobis("clusters"),
    "adapted: Mahalanobis on trained head's hidden layer": adapted_mahalanobis,
    "adapted: 1 - max softmax of trained head": head_uncertainty,
    "ensemble: std of 5 bootstrap heads": ensemble_disagreement,
    "views: abs(p - p(flipped))": flip_disagreement,
    "views: feature cosine distance to flipped": flip_feature_distance,
}
COMBINED: dict[str, Score] = {
    "(f) max(k-NN pooled, envelope) = OODDetector default": detector,
    "(f) max(k-NN multi-layer, envelope)": combined(density("multi", "knn", k=5), envelope),
    "(f) max(Mahalanobis multi-layer, envelope)": combined(density("multi", "mahalanobis"), envelope),
    "(f) max(k-NN pooled, k-NN multi, envelope)": combined(density("pooled", "knn", k=5),
                                                          density("multi", "knn", k=5), envelope),
}


# ------------------------------------------------------------------------------------------ data
def manifest_sets(shared: Path, cache: Path, phantoms: int) -> dict[str, pd.DataFrame]:
    data = shared / "data"
    cxr = read_manifest(data / "cxr-dev/metadata.csv")
    ct_phantoms, cxr_phantoms = (write_phantom_dataset(cache / f"phantoms-{m}", n=phantoms, modality=m)
                                 for m in ("ct", "cxr"))
    return {
        "ucsd-ct": read_manifest(data / "ucsd-ct/labels.csv", split_column="official_split"),
        "ct-ext-luna16": read_manifest(data / "ct-ext-luna16/labels.csv"),
        "cxr-dev": split_manifest(cxr, by="patient", seed=0, keep_existing=False),
        "cxr-ext-figure1": read_manifest(data / "cxr-ext-figure1/labels.csv"),
        "CT phantoms": read_manifest(ct_phantoms),
        "X-ray phantoms": read_manifest(cxr_phantoms),
    }


def part(feats: dict[str, np.ndarray], df: pd.DataFrame, mask: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: v[mask] for k, v in feats.items()}
    out["labels"] = (df["label"].to_numpy()[mask] == "covid").astype(np.int64)
    out["patients"] = df["patient_id"].astype(str).to_numpy()[mask]
    source = df["source_paper"] if "source_paper" in df else df.get("source", df["label"])
    out["sources"] = source.fillna(df["label"]).astype(str).to_numpy()[mask]
    return out


def experiment(name: str, pipeline: str, home: str, others: list[str], sets: dict[str, pd.DataFrame],
               extractor: Extractor, cache: Path) -> str:
    """Fit every score on ``home`` train, threshold on val; AUROC and share flagged on test and ``others``."""
    feats = {s: extract(extractor, sets[s]["path"].tolist(), pipeline, cache / f"{s}-{pipeline}.npz")
             for s in [home, *others]}
    df = sets[home]
    split = df["split"].to_numpy()
    fit, val, test = (part(feats[home], df, split == s) for s in ("train", "val", "test"))
    fit["scale"] = fit["pooled"].std(0) + 1e-6
    outside = {s: part(feats[s], sets[s], np.ones(len(sets[s]), bool)) for s in others}
    columns = [f"AUROC vs {s}" for s in others] + [f"flagged {s}" for s in [f"{home} test", *others]]
    lines = [f"### {name}: fitted on {home} train ({len(fit['labels'])}), threshold = q95 of {home} val "
             f"({len(val['labels'])}), in-distribution test = {home} test ({len(test['labels'])})", "",
             "| score | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, method in {**SINGLE, **COMBINED}.items():
        start = time.perf_counter()
        scorer = method(fit, val)
        threshold = np.quantile(scorer(val), 0.95)
        t = scorer(test)
        aucs, flagged = [], [f"{(t > threshold).mean():.0%}"]
        for s in others:
            o = scorer(outside[s])
            aucs.append(f"{roc_auc_score(np.r_[np.zeros(len(t)), np.ones(len(o))], np.r_[t, o]):.3f}")
            flagged.append(f"{(o > threshold).mean():.0%}")
        lines.append(f"| {label} | " + " | ".join(aucs + flagged) + " |")
        print(f"  {label}: {time.perf_counter() - start:.1f} s", flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/covidscan-ood"))
    parser.add_argument("--phantoms", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    sets = manifest_sets(args.shared, args.cache, args.phantoms)
    extractor = Extractor(args.shared / WEIGHTS)
    runs = [
        ("CT model (paper-A preprocessing)", "ct", "ucsd-ct", ["ct-ext-luna16", "cxr-dev", "CT phantoms"]),
        ("X-ray model (CLAHE, no crop)", "cxr", "cxr-dev", ["cxr-ext-figure1", "ucsd-ct", "X-ray phantoms"]),
    ]
    for name, pipeline, home, others in runs:
        print("\n" + experiment(name, pipeline, home, others, sets, extractor, args.cache) + "\n", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
