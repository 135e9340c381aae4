"""Per-element coordination limits of crystal graphs, learned from real strings (for the SLICES grammar).

A MatterGPT samples graphs whose nodes carry far more bonds than real crystals do (issue 19: decoded
samples at a median 5.9 Å³/atom against 18.5 for MP-20), and the decoder then packs the atoms to give every
bond its length. ``CoordinationTable`` holds, for each element, the largest number of bonds one of its
nodes carries in the training graphs (a loop counts twice, as in ``placement.bond_targets``), and the
element pairs that are bonded at all; ``SlicesGrammarLogitsProcessor`` masks every edge that would break
either. The table is JSON (``slices_coordination.json`` in a tokenizer folder).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from crystal_tokenizers.slices.graph import CrystalGraph

COORDINATION_FILE = "slices_coordination.json"
"""File name of the table in a saved tokenizer folder."""
DEFAULT_QUANTILE = 1.0
"""Share of an element's nodes in the training graphs whose degree is at or below its limit (1.0: the maximum)."""
UNSEEN_MAX_DEGREE = 12
"""Limit for an element no training graph holds (the coordination of close packing)."""


def node_degrees(graph: CrystalGraph) -> list[int]:
    """Bonds per node (a loop ``i i`` counts twice: the atom is bonded to two of its images)."""
    degree = [0] * graph.num_nodes
    for i, j, *_ in graph.edges:
        degree[i] += 1
        degree[j] += 1
    return degree


def element_pair(a: str, b: str) -> tuple[str, str]:
    """An unordered element pair as a sorted tuple."""
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class CoordinationTable:
    """Largest degree per element and the element pairs bonded in the training graphs.

    ``max_degree``: element -> bonds (``UNSEEN_MAX_DEGREE`` for an element not listed); ``pairs``: sorted
    element pairs seen bonded (``None``: every pair allowed); a pair with an element not in ``max_degree``
    is always allowed (nothing is known about it). ``graphs``: how many graphs the table was learned from.
    """

    max_degree: Mapping[str, int]
    pairs: frozenset[tuple[str, str]] | None = None
    graphs: int = 0
    quantile: float = DEFAULT_QUANTILE
    _seen: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_seen", frozenset(self.max_degree))

    def limit(self, element: str) -> int:
        """Most bonds a node of ``element`` may carry."""
        return int(self.max_degree.get(element, UNSEEN_MAX_DEGREE))

    def bonds(self, a: str, b: str) -> bool:
        """Whether elements ``a`` and ``b`` may be bonded."""
        if self.pairs is None or a not in self._seen or b not in self._seen:
            return True
        return element_pair(a, b) in self.pairs

    def admits(self, graph: CrystalGraph) -> bool:
        """Whether every node of ``graph`` is within its limit and every bond joins an allowed pair."""
        degrees = node_degrees(graph)
        if any(d > self.limit(s) for d, s in zip(degrees, graph.species)):
            return False
        return all(self.bonds(graph.species[i], graph.species[j]) for i, j, *_ in graph.edges)

    def to_dict(self) -> dict:
        """JSON-ready form (sorted, so that the file is stable)."""
        return {
            "max_degree": dict(sorted(self.max_degree.items())),
            "pairs": None if self.pairs is None else [list(p) for p in sorted(self.pairs)],
            "graphs": self.graphs,
            "quantile": self.quantile,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CoordinationTable:
        """Inverse of ``to_dict``; ``ValueError`` naming the field that is wrong."""
        try:
            degrees = {str(k): int(v) for k, v in data["max_degree"].items()}
            pairs = None if data.get("pairs") is None else frozenset(element_pair(*map(str, p)) for p in data["pairs"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"coordination table: bad 'max_degree' or 'pairs' ({err!r})") from err
        if any(v < 1 for v in degrees.values()):
            raise ValueError(f"coordination table: limits must be at least 1, got {min(degrees.values())}")
        return cls(degrees, pairs, int(data.get("graphs", 0)), float(data.get("quantile", DEFAULT_QUANTILE)))

    def save(self, path: str) -> None:
        """Write the table as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)

    @classmethod
    def load(cls, path: str) -> CoordinationTable:
        """Read a table written by ``save``."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


def learn_coordination(
    graphs: Iterable[CrystalGraph], quantile: float = DEFAULT_QUANTILE, pairs: bool = True
) -> CoordinationTable:
    """The table of ``graphs``: per element the ``quantile`` of its node degrees (1.0: the largest), and
    (``pairs``) the element pairs bonded in any graph."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    counts: dict[str, Counter[int]] = {}
    seen_pairs: set[tuple[str, str]] = set()
    n = 0
    for graph in graphs:
        n += 1
        for species, degree in zip(graph.species, node_degrees(graph)):
            counts.setdefault(species, Counter())[degree] += 1
        seen_pairs.update(element_pair(graph.species[i], graph.species[j]) for i, j, *_ in graph.edges)
    if n == 0:
        raise ValueError("cannot learn a coordination table from no graphs")
    limits = {element: max(1, _quantile(counter, quantile)) for element, counter in counts.items()}
    return CoordinationTable(limits, frozenset(seen_pairs) if pairs else None, n, quantile)


def _quantile(counter: Counter[int], q: float) -> int:
    """The smallest degree at or above which lie at most ``1 - q`` of the nodes (the ``q`` quantile)."""
    total = sum(counter.values())
    need = math.ceil(q * total - 1e-9)
    running = 0
    for degree in sorted(counter):
        running += counter[degree]
        if running >= need:
            return degree
    return max(counter)


__all__ = [
    "COORDINATION_FILE",
    "DEFAULT_QUANTILE",
    "UNSEEN_MAX_DEGREE",
    "CoordinationTable",
    "element_pair",
    "learn_coordination",
    "node_degrees",
]
