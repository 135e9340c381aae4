"""Property predictors: a HuggingFace sequence-classification/regression model + a crystal tokenizer as
``predict(structures) -> np.ndarray``, the ``PropertyPredictor`` that ``evaluate_structures`` takes.

A regression head (``problem_type == "regression"`` or ``num_labels == 1``) gives the value of one output,
mapped back to physical units with ``value = raw * std + mean`` when the model was trained on standardised
targets. A classification head gives the predicted class id, or the probability of one class when
``output`` names a label. Structures the tokenizer cannot encode get NaN.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalEncodeError
from crystal_tokenizers.loading import load_tokenizer
from training.evaluate import PropertyPredictor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Standardization:
    """Target standardisation used in training: ``value = raw * std + mean`` (property units)."""

    mean: float = 0.0
    std: float = 1.0


def _encode(tokenizer: Any, structures: Sequence[Structure]) -> list[str | None]:
    """Token strings, None where the tokenizer raises ``CrystalEncodeError``."""
    texts = tokenizer.structures_to_strings(structures)
    for structure, text in zip(structures, texts, strict=True):
        if isinstance(text, CrystalEncodeError):
            logger.debug("cannot encode %s: %s", structure.composition.reduced_formula, text)
    return [None if isinstance(text, CrystalEncodeError) else text for text in texts]


def _head_reader(model: torch.nn.Module, output: int | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn logits ``(B, num_labels)`` into one value per row for the model's head type."""
    config = model.config
    if config.problem_type == "regression" or (config.problem_type is None and config.num_labels == 1):
        if not isinstance(output, int) or not 0 <= output < config.num_labels:
            raise ValueError(f"regression output must be an index in 0-{config.num_labels - 1}, got {output!r}")
        return lambda logits: logits[:, output]
    if isinstance(output, str):
        label_ids = {str(label): int(i) for i, label in config.id2label.items()}
        if output not in label_ids:
            raise ValueError(f"label {output!r} is not one of {sorted(label_ids)}")
        return lambda logits: logits.softmax(dim=-1)[:, label_ids[output]]
    return lambda logits: logits.argmax(dim=-1).to(logits.dtype)


def make_predictor(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    output: int | str = 0,
    standardization: Standardization = Standardization(),
    batch_size: int = 32,
) -> PropertyPredictor:
    """Wrap ``model`` (``...ForSequenceClassification``) and ``tokenizer`` as ``predict(structures)``.

    ``output``: the regression output index, or a class label whose probability to return (default for
    classification: the predicted class id). The tokenizer needs ``structures_to_strings`` and padding.
    """
    model.eval()
    read_head = _head_reader(model, output)
    accepted = set(inspect.signature(model.forward).parameters)
    device = next(model.parameters()).device

    def predict(structures: Sequence[Structure]) -> np.ndarray:
        values = np.full(len(structures), np.nan)
        encoded = [(i, text) for i, text in enumerate(_encode(tokenizer, structures)) if text is not None]
        for start in range(0, len(encoded), batch_size):
            rows, texts = zip(*encoded[start : start + batch_size], strict=True)
            batch = tokenizer(list(texts), padding=True, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in batch.items() if k in accepted}
            with torch.no_grad():
                raw = read_head(model(**inputs).logits.float())
            values[list(rows)] = raw.cpu().numpy() * standardization.std + standardization.mean
        return values

    return predict


def load_predictor(
    path: str | Path,
    *,
    output: int | str = 0,
    standardization: Standardization = Standardization(),
    batch_size: int = 32,
    device: str = "cpu",
) -> PropertyPredictor:
    """Load a saved sequence-classification model and its tokenizer from ``path`` as ``predict(structures)``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=True).to(device)
    tokenizer = load_tokenizer(str(path))
    return make_predictor(model, tokenizer, output=output, standardization=standardization, batch_size=batch_size)
