"""Generation helpers shared by models that emit continuous values through a ``<num>`` token.

Inside ``model.generate()`` a numeric model samples the value of each emitted ``<num>`` from its
continuous head. :class:`NumericGenerationState` is the per-call record of those values (created by the
model's ``generate`` and passed to it as a model keyword, never stored on the model);
:class:`NumericValuesProcessor` is the protocol of objects (typically a grammar ``LogitsProcessor``)
that also map sampled values into a valid domain before they are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

Sampler = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]
"""``(params, kind_ids, temperature, greedy) -> values``: one draw per row from a continuous head."""


@runtime_checkable
class NumericValuesProcessor(Protocol):
    """Maps proposed values (B,) for the ``<num>`` just emitted (last column of ``input_ids``) into their domain."""

    def process_numeric_values(
        self, input_ids: torch.LongTensor, numeric_values: torch.FloatTensor, proposals: torch.FloatTensor
    ) -> torch.FloatTensor:
        """``numeric_values`` (B, T) are aligned with ``input_ids`` (B, T) and NaN in the last column."""
        ...


@dataclass
class GenerateNumericOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``numeric_values`` (B, T), aligned with ``sequences``.

    ``numeric_values`` holds the value of every ``<num>`` (prompt values included) and NaN elsewhere.
    """

    numeric_values: torch.FloatTensor | None = None


@dataclass
class NumericGenerationState:
    """Values of the ``<num>`` tokens of one ``generate`` call, grown one column per step.

    ``values`` (B, T) is aligned with the sequences seen so far; ``pending_params`` / ``pending_kinds``
    are the continuous-head outputs at the last position, from which the value of a ``<num>`` emitted
    next is drawn.
    """

    num_token_id: int
    do_sample: bool
    temperature: float = 1.0
    processors: tuple[NumericValuesProcessor, ...] = ()
    values: torch.Tensor | None = None
    pending_params: torch.Tensor | None = None
    pending_kinds: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> NumericGenerationState:
        """Shared, not copied: generate() may deep-copy its keyword arguments, the record must survive."""
        return self

    def extend(self, input_ids: torch.LongTensor, sampler: Sampler) -> None:
        """Grow ``values`` to the length of ``input_ids``, drawing the value of a newly emitted ``<num>``.

        ``sampler(params, kinds, temperature, greedy)`` draws one value per row (NaN where kind is -1).
        """
        if self.values is None:
            raise ValueError("NumericGenerationState.values must hold the prompt values before extending")
        while self.values.shape[1] < input_ids.shape[1]:
            column = self.values.shape[1]
            is_num = input_ids[:, column] == self.num_token_id
            proposals = torch.full(is_num.shape, math.nan, device=self.values.device)
            if self.pending_params is not None and bool(is_num.any()):
                kinds = torch.where(is_num, self.pending_kinds, torch.full_like(self.pending_kinds, -1))
                proposals = sampler(self.pending_params, kinds, self.temperature, not self.do_sample)
                history = pad_values(self.values, column + 1)
                for processor in self.processors:
                    proposals = processor.process_numeric_values(input_ids[:, : column + 1], history, proposals)
            self.pending_params, self.pending_kinds = None, None
            self.values = torch.cat([self.values, torch.where(is_num, proposals, math.nan)[:, None]], dim=1)


def pad_values(values: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad (B, T) values with NaN, or cut them, to ``length`` columns."""
    if values.shape[1] >= length:
        return values[:, :length]
    fill = torch.full((values.shape[0], length - values.shape[1]), math.nan, dtype=values.dtype, device=values.device)
    return torch.cat([values, fill], dim=1)


def mask_to_num_tokens(input_ids: torch.Tensor, values: torch.Tensor, num_token_id: int) -> torch.Tensor:
    """``values`` where ``input_ids`` is ``<num>``, NaN elsewhere (same shape)."""
    return torch.where(input_ids == num_token_id, values, torch.full_like(values, math.nan))


__all__ = [
    "GenerateNumericOutput",
    "NumericGenerationState",
    "NumericValuesProcessor",
    "mask_to_num_tokens",
    "pad_values",
]
