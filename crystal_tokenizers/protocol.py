"""What a crystal tokenizer offers, as ``typing.Protocol`` classes (structural: no base class needed).

``CrystalTokenizer`` is what every tokenizer of the package does (structure <-> text, batch decoding of
``generate`` output, a grammar ``LogitsProcessor``); ``GraphCrystalTokenizer`` adds the SLICES check that
a decoded crystal has the graph its string writes; ``PromptCrystalTokenizer`` takes its generation
conditions as prompt text (Wyckoff). Code that needs one of them checks ``isinstance(tokenizer, X)``
(the protocols are ``runtime_checkable``: the check looks at the methods, not the class).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pymatgen.core import Structure


@runtime_checkable
class CrystalTokenizer(Protocol):
    """Structure <-> token text, batch decoding and a grammar ``LogitsProcessor``."""

    def structure_to_string(self, structure: Structure, **kwargs: Any) -> str:
        """Encode a structure; raises ``CrystalEncodeError``."""
        ...

    def string_to_structure(self, text: str) -> Structure:
        """Decode one text; raises ``CrystalDecodeError``."""
        ...

    def decode_structures(self, sequences: Any) -> list[Any]:
        """Decode a batch of ids or ``generate`` output: a ``Structure`` or the ``CrystalDecodeError`` per row."""
        ...

    def grammar_processor(self, **kwargs: Any) -> Any:
        """A ``LogitsProcessor`` that only allows decodable continuations."""
        ...


@runtime_checkable
class GraphCrystalTokenizer(CrystalTokenizer, Protocol):
    """A tokenizer whose text is a crystal graph (SLICES): a decode is valid when its graph is the text's."""

    def graph_matches(self, original: Structure, decoded: Structure) -> bool:
        """Whether ``decoded`` has the crystal graph of ``original``."""
        ...

    def string_graph_matches(self, text: str, decoded: Structure) -> bool:
        """Whether ``decoded`` has the crystal graph written in ``text``."""
        ...


@runtime_checkable
class PromptCrystalTokenizer(CrystalTokenizer, Protocol):
    """A tokenizer whose generation conditions are prompt text (Wyckoff)."""

    def condition_prefix(self, **conditions: Any) -> str:
        """The prompt text (condition tokens and ``<sep>``) for ``conditions``."""
        ...


@runtime_checkable
class StatisticsTokenizer(Protocol):
    """A tokenizer that keeps statistics of its training data (``crystal-lm train`` fits them first)."""

    def fit_training_statistics(self, texts: Any) -> Any:
        """Learn the statistics from the training texts (a list of str); saved with the tokenizer."""
        ...
