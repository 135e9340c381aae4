"""The crystal-lm pipeline: data preparation, the Accelerate training loop, evaluation, sampling, the CLI."""

from training.evaluate import EvaluationReport, StructureRecord, evaluate_structures, write_report
from training.io import StructureSet, parse_cif, read_structures
from training.loop import TrainConfig, train
from training.predictors import load_predictor, make_predictor

__all__ = [
    "EvaluationReport",
    "StructureRecord",
    "StructureSet",
    "TrainConfig",
    "evaluate_structures",
    "load_predictor",
    "make_predictor",
    "parse_cif",
    "read_structures",
    "train",
    "write_report",
]
