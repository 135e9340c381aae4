"""Element statistics of a training set: which elements occur, and which occur together.

Counted per crystal from its Wyckoff tokens (one element token per occupied orbit): ``frequency[e]`` is
the number of crystals containing ``e``; ``pairs[(a, b)]`` the number containing both ``a`` and ``b``
(``a != b``), and ``pairs[(e, e)]`` the number where ``e`` occupies two or more orbits (so that a masked
orbit may take an element present elsewhere). The inpainting ranker's co-occurrence prior and baseline
read them (``training.chemistry``). ``WyckoffTokenizer.fit_training_statistics`` learns them from the
training texts and saves them beside the vocabulary as ``element_statistics.json``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from crystal_tokenizers.records import JsonRecord
from crystal_tokenizers.wyckoff.masking import element_positions

ELEMENT_STATISTICS_FILE = "element_statistics.json"
"""File name of the statistics in a saved tokenizer folder."""
_PAIR_SEPARATOR = " "


@dataclass(frozen=True)
class ElementStatistics(JsonRecord):
    """Crystals per element and per (ordered) element pair, over ``crystals`` training crystals (JSON: ``save``/``load``)."""

    frequency: Counter = field(default_factory=Counter)
    pairs: Counter = field(default_factory=Counter)
    crystals: int = 0

    @classmethod
    def from_token_lists(cls, token_lists: Iterable[Sequence[str]]) -> ElementStatistics:
        """Count the crystals of ``token_lists`` (token strings, as ``convert_ids_to_tokens`` gives them)."""
        frequency: Counter = Counter()
        pairs: Counter = Counter()
        crystals = 0
        for tokens in token_lists:
            orbit_elements = Counter(tokens[i] for i in element_positions(tokens))
            if not orbit_elements:
                continue
            crystals += 1
            present = sorted(orbit_elements)
            frequency.update(present)
            pairs.update(itertools.permutations(present, 2))
            pairs.update((e, e) for e, n in orbit_elements.items() if n >= 2)
        return cls(frequency, pairs, crystals)

    def to_dict(self) -> dict:
        """JSON-ready form: pair keys are ``"A B"``."""
        return {"crystals": self.crystals, "frequency": dict(self.frequency.most_common()),
                "pairs": {f"{a}{_PAIR_SEPARATOR}{b}": n for (a, b), n in sorted(self.pairs.items())}}

    @classmethod
    def from_dict(cls, raw: dict) -> ElementStatistics:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a malformed mapping."""
        try:
            pairs = Counter({tuple(key.split(_PAIR_SEPARATOR)): int(n) for key, n in raw["pairs"].items()})
            if any(len(key) != 2 for key in pairs):
                raise ValueError("a pair key is not two element symbols")
            return cls(Counter({e: int(n) for e, n in raw["frequency"].items()}), pairs, int(raw["crystals"]))
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"malformed element statistics: {error}") from error


__all__ = ["ELEMENT_STATISTICS_FILE", "ElementStatistics"]
