"""JSON files of what a tokenizer learns from its training data (saved beside ``vocab.json``).

A class with ``to_dict`` / ``from_dict`` (the coordination table of SLICES-PLUS, the element statistics of
Wyckoff) inherits :class:`JsonRecord` for ``save`` / ``load``; ``CrystalTokenizerBase.save_vocabulary``
writes every record a tokenizer names in ``fitted_records``.
"""

from __future__ import annotations

import json
from typing import Any


class JsonRecord:
    """``save`` / ``load`` as JSON for a class with ``to_dict`` and the classmethod ``from_dict``."""

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, raw: dict) -> Any:
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write the record as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)

    @classmethod
    def load(cls, path: str) -> Any:
        """Read a record written by :meth:`save`; raises ``ValueError`` naming the file when it is malformed."""
        with open(path, encoding="utf-8") as handle:
            try:
                return cls.from_dict(json.load(handle))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}: {error}") from error


__all__ = ["JsonRecord"]
