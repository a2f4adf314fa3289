"""Re-run every row of a paper's results table, under its own protocol and under patient-level splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidscan.config import load_config
from covidscan.errors import ConfigError
from covidscan.outputs import check_output, write_text
from covidscan.training.run import train_experiment

PAPER_ROWS: dict[str, tuple[str, ...]] = {
    "paper-a": ("paper-a-resnet50", "paper-a-resnet50-noprep", "paper-a-bpnn"),
    "paper-b": ("paper-b-vgg19", "paper-b-vgg19-aug", "paper-b-mobilenet", "paper-b-mobilenet-aug"),
}

# The papers split images at random (80/20), report at a 0.5 threshold and have no validation set.
# "patient" keeps a manifest's own patient-disjoint split (e.g. ucsd-ct's official one) or makes one.
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "paper": (
        "data.split_by=image",
        "data.ratios=[0.8, 0.2]",
        "data.resplit=true",
        "evaluation.threshold=fixed",
        "evaluation.calibrate=false",
    ),
    "patient": ("data.split_by=patient",),
}

# The BPNN row works on raw pixels: backbone settings given for the CNN rows do not apply to it.
BACKBONE_KEYS = ("model.backbone=", "model.weights=", "model.train_mode=", "model.unfreeze_last=")

TABLE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    lo, hi = entry.get("ci95") or (None, None)
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{entry['value']:.3f}{ci}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: our figures with 95% CIs beside the published ones."""
    head = ["row", "protocol", *TABLE_METRICS, "published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        metrics = row["metrics"]["metrics"]
        published = ", ".join(f"{k} {v:g}" for k, v in (row["published"] or {}).items()) or "-"
        cells = [row["preset"], row["protocol"], *(_cell(metrics.get(m)) for m in TABLE_METRICS), published]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce_paper(
    paper: str,
    data: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    progress: bool = True,
) -> Path:
    """Train every row of ``paper`` under both protocols into ``out/<row>/<protocol>``; write table.md.

    ``out`` may not be or hold the data (each row's run folder must be new or empty).
    """
    if paper not in PAPER_ROWS:
        raise ConfigError(f"unknown paper {paper!r}; choose one of {', '.join(PAPER_ROWS)}")
    out = check_output(out, [data])
    rows = []
    for preset in PAPER_ROWS[paper]:
        for protocol, protocol_overrides in PROTOCOLS.items():
            row_overrides = list(overrides)
            if load_config(preset).model.head == "bpnn":
                row_overrides = [o for o in overrides if not o.startswith(BACKBONE_KEYS)]
            cfg = load_config(preset, [*protocol_overrides, *row_overrides])
            result = train_experiment(cfg, data, out / preset / protocol, progress=progress)
            rows.append(
                {
                    "preset": preset,
                    "protocol": protocol,
                    "metrics": result.metrics,
                    "published": cfg.published,
                }
            )
    text = (
        f"# {paper}: published figures beside ours\n\n"
        f"Data: `{data}`. Overrides: `{' '.join(overrides) or 'none'}`. Each cell: value [95% CI], CIs "
        "from a bootstrap over patients (images when there are no patient ids).\n\n"
        "`paper` = the published protocol (random 80/20 image split, threshold 0.5): slices of one patient "
        "can sit in train and test. `patient` = patient-disjoint splits, threshold and calibration chosen "
        "on validation.\n\n" + format_table(rows) + "\n"
    )
    return write_text(out / "table.md", text)
