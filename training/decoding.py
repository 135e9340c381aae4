"""Decode columns of token strings to crystals and report per row (the library behind ``crystal-lm decode``).

Batch API: a bad row (an empty cell, a malformed string, a decoder failure) is one failure named by its
row and reason, never an exception for the batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pymatgen.core import Structure

from crystal_tokenizers import (
    CRYSTAL_SYSTEMS,
    CrystalDecodeError,
    GraphCrystalTokenizer,
    MalformedSequenceError,
    structure_crystal_system,
)

logger = logging.getLogger(__name__)


@dataclass
class DecodeReport:
    """Counts of one decode run.

    ``valid`` = decoded and the crystal graph matches the string, for graph tokenizers (SLICES); None for
    tokenizers without a graph check (Wyckoff: every decoded string is its crystal).
    """

    n: int
    decoded: int
    valid: int | None
    decode_per_s: float
    errors: dict[str, int]
    by_crystal_system: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_failures: bool = False) -> dict[str, Any]:
        """JSON-ready dict, with rates (0–1); the per-row failures only on request."""
        data = asdict(self)
        if not with_failures:
            data.pop("failures")
        data["decoded_rate"] = self.decoded / self.n if self.n else 0.0
        if self.valid is None:
            data.pop("valid")
        else:
            data["valid_rate"] = self.valid / self.n if self.n else 0.0
        labelled = sum(v["n"] for v in self.by_crystal_system.values())
        if labelled:
            data["crystal_system_rate"] = sum(v["correct"] for v in self.by_crystal_system.values()) / labelled
        return data


def label_name(label: Any) -> str:
    """Crystal-system name of a label: 0–6 in the package numbering, or the name itself."""
    try:
        return CRYSTAL_SYSTEMS[int(label)]
    except (TypeError, ValueError, IndexError):
        return str(label)


def cell_text(value: Any) -> str:
    """The string in a table cell; raises ``MalformedSequenceError`` for an empty or missing cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise MalformedSequenceError("empty cell: no token string")
    text = str(value)
    if not text.strip():
        raise MalformedSequenceError("empty cell: no token string")
    return text


def decode_texts(
    tokenizer: Any,
    texts: Sequence[Any],
    labels: Sequence[Any] | None = None,
    ids: Sequence[str] | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
) -> tuple[DecodeReport, list[Structure | None]]:
    """Decode every text (a table cell: None/NaN/empty is a failed row); count decoded, valid and crystal systems.

    ``labels`` are crystal-system labels per row (names or 0–6); ``ids`` name the rows in the failures
    (default: the row index). An unexpected decoder exception is one failure too (logged with its traceback
    at debug level).
    """
    ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    graph_check = isinstance(tokenizer, GraphCrystalTokenizer)
    errors: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    structures: list[Structure | None] = []
    seconds = 0.0
    valid = 0
    by_system: dict[str, dict[str, int]] = {}
    for index, value in enumerate(progress(texts)):
        start = time.perf_counter()
        structure: Structure | None = None
        try:
            text = cell_text(value)
            structure = tokenizer.string_to_structure(text)
        except Exception as err:  # noqa: BLE001 - one bad row is one failure (typed errors expected)
            if not isinstance(err, CrystalDecodeError):
                logger.debug("row %s: unexpected decoder error", ids[index], exc_info=True)
            errors[type(err).__name__] += 1
            failures.append({"index": index, "id": ids[index], "error": type(err).__name__, "message": str(err)})
        seconds += time.perf_counter() - start
        structures.append(structure)
        if structure is not None and graph_check and tokenizer.string_graph_matches(text, structure):
            valid += 1
        if labels is not None:
            name = label_name(labels[index])
            counts = by_system.setdefault(name, {"n": 0, "decoded": 0, "correct": 0})
            counts["n"] += 1
            if structure is not None:
                counts["decoded"] += 1
                counts["correct"] += structure_crystal_system(structure) == name
    report = DecodeReport(
        n=len(texts),
        decoded=sum(s is not None for s in structures),
        valid=valid if graph_check else None,
        errors=dict(errors),
        by_crystal_system=by_system,
        decode_per_s=len(texts) / seconds if seconds > 0 else float("inf"),
        failures=failures,
    )
    return report, structures
