"""Generation helpers shared by models that emit continuous values through a ``<num>`` token.

Inside ``model.generate()`` a numeric model samples the value of each emitted ``<num>`` from its continuous
head. :class:`NumericGenerationState` is the per-call record of those values (created by the model's
``generate`` and passed to it as a model keyword, never stored on the model). It follows every decoding
strategy of ``GenerationMixin``:

- greedy and multinomial sampling: the value of a ``<num>`` chosen at step s is drawn from the head's output
  at the last position of step s and fed, embedded, at step s + 1;
- beam search: every step's draws are logged per running beam; the cache reorder moves the record with the
  beams, and the values of the returned beams are read back through ``beam_indices``;
- assisted decoding: candidates are cut before their first ``<num>`` (the main model must draw every value
  itself), and a rejected tail is dropped from the record as from the cache.

:class:`NumericValuesProcessor` is the protocol of objects (typically a grammar ``LogitsProcessor``) that also
map sampled values into a valid domain before they are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from transformers.generation.candidate_generator import AssistedCandidateGenerator, CandidateGenerator
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

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
class GenerateBeamNumericOutput(GenerateBeamDecoderOnlyOutput):
    """``GenerateBeamDecoderOnlyOutput`` (``sequences_scores``, ``beam_indices``) plus ``numeric_values``."""

    numeric_values: torch.FloatTensor | None = None


def pad_values(values: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad (B, T) values with NaN, or cut them, to ``length`` columns."""
    if values.shape[1] >= length:
        return values[:, :length]
    fill = torch.full((values.shape[0], length - values.shape[1]), math.nan, dtype=values.dtype, device=values.device)
    return torch.cat([values, fill], dim=1)


def mask_to_num_tokens(input_ids: torch.Tensor, values: torch.Tensor, num_token_id: int) -> torch.Tensor:
    """``values`` where ``input_ids`` is ``<num>``, NaN elsewhere (same shape)."""
    return torch.where(input_ids == num_token_id, values, torch.full_like(values, math.nan))


@dataclass
class NumericGenerationState:
    """Values of the ``<num>`` tokens of one ``generate`` call.

    ``values`` (N, T) is aligned with the N running sequences; ``pending_params`` / ``pending_kinds`` are the
    head's outputs at the last forward for each running row, from which the value of a ``<num>`` emitted next
    is drawn (only then); with ``log_draws`` (beam search), ``draws`` logs every step's drawn values (N,)
    (NaN where none was drawn), indexed like ``beam_indices``; ``accepted`` / ``fed_length`` are the verified and the fed lengths
    of the last forward (they differ under assisted decoding).
    """

    num_token_id: int
    sampler: Sampler
    do_sample: bool
    temperature: float = 1.0
    processors: tuple[NumericValuesProcessor, ...] = ()
    log_draws: bool = False
    values: torch.Tensor | None = None
    pending_params: torch.Tensor | None = None
    pending_kinds: torch.Tensor | None = None
    source: torch.Tensor | None = None
    draws: list[torch.Tensor] = field(default_factory=list)
    accepted: int = 0
    fed_length: int = 0
    last_params: torch.Tensor | None = None
    last_kinds: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> NumericGenerationState:
        """Shared, not copied: generate() may deep-copy its keyword arguments, the record must survive."""
        return self

    def extend(self, input_ids: torch.LongTensor) -> None:
        """Grow ``values`` to the length of ``input_ids``: the value of a newly emitted ``<num>``, then NaN.

        Columns past the first new one are unverified candidates (assisted decoding), which hold no ``<num>``.
        """
        if self.values is None:
            raise ValueError("NumericGenerationState.values must hold the prompt values before extending")
        column = self.values.shape[1]
        if column < input_ids.shape[1] and self.pending_params is not None:
            is_num = input_ids[:, column] == self.num_token_id
            proposals = torch.full(is_num.shape, math.nan, device=self.values.device)
            if bool(is_num.any()):
                kinds = torch.where(is_num, self.pending_kinds, torch.full_like(self.pending_kinds, -1))
                proposals = self.sampler(self.pending_params, kinds, self.temperature, not self.do_sample)
                history = pad_values(self.values, column + 1)
                for processor in self.processors:
                    proposals = processor.process_numeric_values(input_ids[:, : column + 1], history, proposals)
                proposals = torch.where(is_num, proposals, torch.full_like(proposals, math.nan))
                if self.draws:
                    rows = self.source if self.source is not None else torch.arange(len(proposals))
                    self.draws[-1][rows[is_num]] = proposals[is_num].to(self.draws[-1].dtype)
            self.values = torch.cat([self.values, proposals[:, None].to(self.values.dtype)], dim=1)
            self.pending_params, self.pending_kinds, self.source = None, None, None
        self.accepted = self.values.shape[1]
        self.values = pad_values(self.values, input_ids.shape[1])
        self.fed_length = input_ids.shape[1]

    def after_forward(self, params: torch.Tensor, kind_ids: torch.Tensor, num_new_tokens: int = 1) -> None:
        """Keep the verified prefix and draw the next value from the head's outputs (N, K, 3, M) / (N, K).

        The next token follows the ``accepted + num_new_tokens - 1`` verified tokens, so its value comes from
        the output at the position before it (the last one, except after a partly rejected assisted draft).
        """
        prefix = self.accepted + num_new_tokens - 1
        index = prefix - 1 - (self.fed_length - params.shape[1])
        self.values = self.values[:, :prefix] if self.values is not None else None
        self.pending_params, self.pending_kinds, self.source = params[:, index], kind_ids[:, index], None
        if self.log_draws:
            self.draws.append(torch.full(kind_ids.shape[:1], math.nan, device=params.device))
        self.last_params, self.last_kinds = self.pending_params, self.pending_kinds

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow a beam-search reorder: running row k continues row ``beam_idx[k]``."""
        beam_idx = beam_idx.to(self.values.device).long()
        self.values = self.values[beam_idx]
        if self.pending_params is not None:
            self.pending_params, self.pending_kinds = self.pending_params[beam_idx], self.pending_kinds[beam_idx]
        self.source = beam_idx

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """Values (N, T) aligned with the final running ``sequences`` (non-beam decoding)."""
        self.extend(sequences)
        return mask_to_num_tokens(sequences, pad_values(self.values, sequences.shape[1]), self.num_token_id)

    def beam_values(
        self, sequences: torch.LongTensor, beam_indices: torch.Tensor, prompt_values: torch.Tensor
    ) -> torch.Tensor:
        """Values (F, T) of returned beams: prompt values of their batch row, then each step's logged draw.

        ``beam_indices`` (F, S) holds, per generated step, the flat running row the token came from (-1 after
        the end); ``prompt_values`` (N, P) are the expanded prompt values of the running rows.
        """
        prompt_length = prompt_values.shape[1]
        first_rows = beam_indices[:, 0].clamp(min=0).long()
        values = pad_values(prompt_values[first_rows], sequences.shape[1]).clone()
        for step in range(min(beam_indices.shape[1], len(self.draws), sequences.shape[1] - prompt_length)):
            rows = beam_indices[:, step].long()
            drawn = self.draws[step].to(values.device)[rows.clamp(min=0)]
            values[:, prompt_length + step] = torch.where(rows >= 0, drawn, torch.full_like(drawn, math.nan))
        last = sequences.shape[1] - 1
        step = last - prompt_length
        ends_in_num = (sequences[:, last] == self.num_token_id) & torch.isnan(values[:, last])
        if 0 <= step < beam_indices.shape[1] and bool(ends_in_num.any()):  # emitted at the last step, never fed
            rows = beam_indices[:, step].long().clamp(min=0).to(self.last_params.device)
            kinds = torch.where(ends_in_num, self.last_kinds[rows], torch.full_like(rows, -1))
            proposals = self.sampler(self.last_params[rows], kinds, self.temperature, not self.do_sample)
            for processor in self.processors:
                proposals = processor.process_numeric_values(sequences, pad_values(values, last), proposals)
            values[:, last] = torch.where(ends_in_num, proposals.to(values.dtype), values[:, last])
        return mask_to_num_tokens(sequences, values, self.num_token_id)


def property_condition_tensors(
    property_names: Sequence[str], targets: Mapping[str, float], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``properties`` (B, P) and ``property_mask`` (B, P) of a model conditioned on ``property_names`` for
    ``targets`` (name -> value, data units); the others unconditioned. Raises ``ValueError`` naming an
    unknown target."""
    unknown = sorted(set(targets) - set(property_names))
    if unknown:
        raise ValueError(f"the model does not condition on {unknown} (it knows {list(property_names)})")
    values = torch.tensor([float(targets.get(name, math.nan)) for name in property_names])
    mask = torch.isfinite(values)
    return torch.nan_to_num(values).repeat(batch_size, 1), mask.repeat(batch_size, 1)


class NumericCandidateGenerator(CandidateGenerator):
    """Assisted decoding for numeric models: an assistant's draft, cut before its first ``<num>``.

    The main model draws the value of every ``<num>`` from its own head, so a draft token after a ``<num>``
    would be verified against a value the main model never chose; the draft stops just before it, and the
    main model emits the ``<num>`` itself. The assistant is given the values chosen so far.
    """

    def __init__(self, inner: AssistedCandidateGenerator, state: NumericGenerationState) -> None:
        self.inner = inner
        self.state = state
        inner.assistant_kwargs.pop("numeric_state", None)

    @property
    def requires_model_outputs(self) -> bool:  # type: ignore[override]
        return self.inner.requires_model_outputs

    def __getattr__(self, name: str) -> Any:
        """Everything else the decoding loop reads (``num_drafting_tokens``, ``assistant_model``...) is the
        wrapped generator's, whichever transformers version asks for it."""
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, torch.Tensor | None]:
        if self.state.values is None:  # before the first forward: the prompt's values
            self.state.values = self.inner.assistant_kwargs["numeric_values"].float()
        self.state.extend(input_ids)
        self.inner.assistant_kwargs["numeric_values"] = self.state.values[:, : input_ids.shape[1]].clone()
        candidates, logits = self.inner.get_candidates(input_ids, **kwargs)
        draft = candidates[:, input_ids.shape[1]:]
        is_num = (draft == self.state.num_token_id).any(dim=0)
        keep = int(is_num.float().argmax()) if bool(is_num.any()) else draft.shape[1]
        return candidates[:, : input_ids.shape[1] + keep], None if logits is None else logits[:, :keep]

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)


__all__ = [
    "GenerateBeamNumericOutput",
    "GenerateNumericOutput",
    "NumericCandidateGenerator",
    "NumericGenerationState",
    "NumericValuesProcessor",
    "mask_to_num_tokens",
    "pad_values",
    "property_condition_tensors",
]
