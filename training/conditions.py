"""Generation conditions: checking what the user asked for against the model, and the condition tensors.

Shared by sampling (``training.sampling``), fine-tuning (``training.finetune``) and the CLI, so neither
imports the other for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from crystal_tokenizers import CRYSTAL_SYSTEMS
from modeling.generation import property_condition_tensors


class ConditionError(ValueError):
    """A generation condition is malformed or not one the model knows (the message names it)."""


def condition_tensors(config: Any, targets: Mapping[str, float], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``properties`` (B, P) and ``property_mask`` (B, P) for ``targets`` (data units); others unconditioned."""
    try:
        return property_condition_tensors(config.property_names, targets, batch_size)
    except ValueError as err:
        raise ConditionError(str(err)) from None


def parse_composition(text: str) -> dict[str, int]:
    """``"Na:4,Cl:4"`` -> ``{"Na": 4, "Cl": 4}`` (conventional-cell counts)."""
    counts = {}
    for item in text.split(","):
        element, _, count = item.strip().partition(":")
        if not count.isdigit():
            raise ConditionError(f"composition item {item!r} is not El:count")
        counts[element] = int(count)
    return counts


def parse_properties(items: Sequence[str]) -> dict[str, float]:
    """``["band_gap=1.5"]`` -> ``{"band_gap": 1.5}`` (values in the model's units)."""
    values = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise ConditionError(f"property condition {item!r} is not NAME=VALUE") from None
    return values


def check_graph_conditions(config: Any, crystal_system: str | None, properties: Mapping[str, float]) -> None:
    """Raise ``ConditionError`` unless a MatterGPT with ``config`` knows the crystal system and properties."""
    if crystal_system and crystal_system not in CRYSTAL_SYSTEMS:
        raise ConditionError(f"crystal system {crystal_system!r} is not one of {CRYSTAL_SYSTEMS}")
    known = list(getattr(config, "property_names", ()) or ())
    unknown = sorted(set(properties) - set(known))
    if unknown:
        raise ConditionError(f"the model has no condition {unknown}; it knows {known}")
