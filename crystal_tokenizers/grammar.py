"""The shared mechanism of the grammar-constrained ``LogitsProcessor`` classes (Wyckoff and SLICES).

A subclass keeps one parser state per batch row: it says how to start a state (``_new_row``), how one
token moves it (``_advance``) and which token ids may follow (``allowed_tokens``). This base class keeps
the states in step with ``generate``: one new column per step is consumed incrementally, any other
change (a new prompt, a new batch) restarts the states from the whole sequence.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import LogitsProcessor

logger = logging.getLogger(__name__)


class IncrementalGrammarProcessor(LogitsProcessor):
    """Masks every token that the subclass's grammar does not allow after each row's prefix."""

    eos_id: int

    def __init__(self) -> None:
        self._rows: list[Any] = []
        self._seen: torch.Tensor | None = None

    def _new_row(self) -> Any:
        """A fresh parser state."""
        raise NotImplementedError

    def _advance(self, row: Any, token_id: int, column: int) -> None:
        """Consume one token (prompt or generated) at ``column``."""
        raise NotImplementedError

    def allowed_tokens(self, row: Any, length: int) -> list[int]:
        """Token ids that may follow ``row`` when the sequence is ``length`` tokens long."""
        raise NotImplementedError

    def _sync(self, input_ids: torch.LongTensor) -> None:
        """Advance the per-row states to ``input_ids`` (one new column), or restart on a new prompt."""
        seen = self._seen
        if seen is not None and seen.shape == input_ids.shape and torch.equal(seen, input_ids):
            return
        ids = input_ids.tolist()
        if (seen is not None and seen.shape[0] == input_ids.shape[0] and seen.shape[1] + 1 == input_ids.shape[1]
                and torch.equal(seen, input_ids[:, :-1])):
            for row, sequence in zip(self._rows, ids):
                self._advance(row, sequence[-1], len(sequence) - 1)
        else:
            self._rows = [self._new_row() for _ in ids]
            for row, sequence in zip(self._rows, ids):
                for column, token_id in enumerate(sequence):
                    self._advance(row, token_id, column)
        self._seen = input_ids.clone()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._sync(input_ids)
        length = input_ids.shape[1]
        rows, columns = [], []
        for index, row in enumerate(self._rows):
            allowed = self.allowed_tokens(row, length)
            if not allowed:
                logger.warning("no completable continuation for sequence %d in phase %s; ending it",
                               index, row.phase.value)
                allowed = [self.eos_id]
            rows.extend([index] * len(allowed))
            columns.extend(allowed)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask[torch.tensor(rows, device=scores.device), torch.tensor(columns, device=scores.device)] = True
        return scores.masked_fill(~mask, -math.inf)
