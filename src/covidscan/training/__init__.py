"""Training: presets in, run directories out."""

from covidscan.training.reproduce import PAPER_ROWS, reproduce_paper
from covidscan.training.run import TrainResult, load_dataset, train_experiment

__all__ = ["PAPER_ROWS", "TrainResult", "load_dataset", "reproduce_paper", "train_experiment"]
