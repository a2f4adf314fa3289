"""Run directories as older covidscan versions wrote them, to test that they still load."""

from __future__ import annotations

from covidscan.runs import Checkpoint


def legacy_checkpoint(new: Checkpoint) -> dict:
    """``new`` as covidscan 0.1 wrote it (checkpoint format 1), to test that old runs still load."""
    return {
        "format": 1, "covidscan_version": "0.1.0", "classes": ["non_covid", "covid"], "modality": "ct",
        "preprocess": new.preprocess.model_dump(mode="json"), "input_size": list(new.input_size),
        "mean": list(new.mean), "std": list(new.std), "threshold": new.calibration.threshold,
        "temperature": new.calibration.temperature, "patient_threshold": new.calibration.patient_threshold,
    }
