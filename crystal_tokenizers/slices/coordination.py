"""Per-element coordination limits of crystal graphs, learned from real strings (for the SLICES grammar).

A MatterGPT samples graphs whose nodes carry far more bonds than real crystals do (issue 19: decoded
samples at a median 5.9 Å³/atom against 18.5 for MP-20), and the decoder then packs the atoms to give every
bond its length. ``CoordinationTable`` holds, for each element, the largest number of bonds one of its
nodes carries in the training graphs (a loop counts twice, as in ``placement.bond_targets``), and the
element pairs that are bonded at all; ``SlicesGrammarLogitsProcessor`` masks every edge that would break
either. The table is JSON (``slices_coordination.json`` in a tokenizer folder).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from crystal_tokenizers.records import JsonRecord
from crystal_tokenizers.slices.graph import CrystalGraph
from crystal_tokenizers.slices.placement import bond_radius

COORDINATION_FILE = "slices_coordination.json"
"""File name of the table in a saved tokenizer folder."""
DEFAULT_QUANTILE = 1.0
"""Share of an element's nodes in the training graphs whose degree is at or below its limit (1.0: the maximum)."""
DEFAULT_VOLUME_QUANTILE = 0.25
"""Share of the training graphs (of those with a finite bound) allowed below the volume-bound threshold.

On the MP-20 sample (2,016 training strings, 644 with a finite bound) the bounds run from 1.8 Å³/atom
(1st percentile 3.8, quartile 9.3, median 16.1); 50 MatterGPT samples under the old grammar had a median
of 1.5. Decoded volume of 40 samples of one model, median Å³/atom: 5.6 without the rule, 6.5 at
quantile 0.01, 8.1 at 0.25, 8.3 at 0.5 (issue 19). 0.25 rejects the 8 % of training graphs below it."""
UNSEEN_MAX_DEGREE = 12
"""Limit for an element no training graph holds (the coordination of close packing)."""


def node_degrees(graph: CrystalGraph) -> list[int]:
    """Bonds per node (a loop ``i i`` counts twice: the atom is bonded to two of its images)."""
    degree = [0] * graph.num_nodes
    for i, j, *_ in graph.edges:
        degree[i] += 1
        degree[j] += 1
    return degree


Cycle = tuple[tuple[int, int, int], float]
"""A short cycle of the quotient graph: its net lattice offset and the sum of its bond lengths (Å)."""


def bond_length(a: str, b: str) -> float:
    """Bond length estimate (Å) of an ``a``-``b`` bond: the sum of the decoder's bond radii."""
    return bond_radius(a) + bond_radius(b)


def new_cycles(species: tuple[str, ...] | list[str], i: int, j: int, v: tuple[int, int, int],
               same_pair: list[tuple[int, int, int]]) -> list[Cycle]:
    """Cycles of one or two bonds that the edge ``(i, j, v)`` closes: a loop is one (offset ``v``), and with
    each earlier edge ``(i, j, u)`` of the same pair it closes one of two bonds (offset ``v - u``)."""
    if i == j:
        return [(v, bond_length(species[i], species[i]))]
    length = 2 * bond_length(species[i], species[j])
    return [((v[0] - u[0], v[1] - u[1], v[2] - u[2]), length) for u in same_pair]


@dataclass(frozen=True)
class CycleBound:
    """Short cycles of a partial graph, the cross products of their pairs and the volume bound they give.

    Hadamard's inequality for three independent cycles with offsets ``w_k`` and bond-length sums ``s_k``:
    ``V |det W| = |det(L W)| <= prod |L w_k| <= prod s_k``, so ``V <= prod s_k / |det W|`` (Å³ per cell);
    ``det W = w_3 . (w_1 x w_2)``, so each new cycle costs one dot product per earlier pair.
    """

    cycles: tuple[Cycle, ...] = ()
    crosses: tuple[tuple[tuple[int, int, int], float], ...] = ()
    volume: float = math.inf

    def extended(self, fresh: Iterable[Cycle]) -> CycleBound:
        """The bound after adding the cycles ``fresh``."""
        cycles, crosses, volume = list(self.cycles), list(self.crosses), self.volume
        for w, length in fresh:
            for (x, y, z), product in crosses:
                det = abs(w[0] * x + w[1] * y + w[2] * z)
                if det:
                    volume = min(volume, product * length / det)
            for u, other in cycles:
                cross = (u[1] * w[2] - u[2] * w[1], u[2] * w[0] - u[0] * w[2], u[0] * w[1] - u[1] * w[0])
                if cross != (0, 0, 0):
                    crosses.append((cross, other * length))
            cycles.append((w, length))
        return CycleBound(tuple(cycles), tuple(crosses), volume)


def graph_volume_bound(graph: CrystalGraph) -> float:
    """``CycleBound`` of every loop and two-bond cycle of ``graph``, per atom (Å³/atom; ``inf`` without
    three independent ones)."""
    bound = CycleBound()
    earlier: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for i, j, a, b, c in graph.edges:
        bound = bound.extended(new_cycles(graph.species, i, j, (a, b, c), earlier.get((i, j), [])))
        earlier.setdefault((i, j), []).append((a, b, c))
    return bound.volume / graph.num_nodes


def element_pair(a: str, b: str) -> tuple[str, str]:
    """An unordered element pair as a sorted tuple."""
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class CoordinationTable(JsonRecord):
    """Largest degree per element and the element pairs bonded in the training graphs.

    ``max_degree``: element -> bonds (``UNSEEN_MAX_DEGREE`` for an element not listed); ``pairs``: sorted
    element pairs seen bonded (``None``: every pair allowed); a pair with an element not in ``max_degree``
    is always allowed (nothing is known about it). ``graphs``: how many graphs the table was learned from.
    ``min_volume_bound``: short cycles (loops, two bonds between one pair) fix lattice vectors at about a
    bond length, so three independent ones bound the cell volume; sampled graphs with many of them decode
    far too dense (issue 19), and the grammar keeps the bound at or above the training graphs' smallest.
    """

    max_degree: Mapping[str, int]
    pairs: frozenset[tuple[str, str]] | None = None
    graphs: int = 0
    quantile: float = DEFAULT_QUANTILE
    min_volume_bound: float | None = None
    """Å³/atom: the smallest ``graph_volume_bound`` of the training graphs; a graph whose loops and
    two-bond cycles force a denser cell is not written (None: no such rule)."""
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
        if self.min_volume_bound is not None and graph_volume_bound(graph) < self.min_volume_bound:
            return False
        return all(self.bonds(graph.species[i], graph.species[j]) for i, j, *_ in graph.edges)

    def to_dict(self) -> dict:
        """JSON-ready form (sorted, so that the file is stable)."""
        return {
            "max_degree": dict(sorted(self.max_degree.items())),
            "pairs": None if self.pairs is None else [list(p) for p in sorted(self.pairs)],
            "graphs": self.graphs,
            "quantile": self.quantile,
            "min_volume_bound": self.min_volume_bound,
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
        bound = data.get("min_volume_bound")
        return cls(degrees, pairs, int(data.get("graphs", 0)), float(data.get("quantile", DEFAULT_QUANTILE)),
                   None if bound is None else float(bound))


def learn_coordination(
    graphs: Iterable[CrystalGraph], quantile: float = DEFAULT_QUANTILE, pairs: bool = True,
    volume_quantile: float | None = DEFAULT_VOLUME_QUANTILE,
) -> CoordinationTable:
    """The table of ``graphs``: per element the ``quantile`` of its node degrees (1.0: the largest),
    (``pairs``) the element pairs bonded in any graph, and the ``volume_quantile`` (0: the smallest; None:
    no volume rule) of the volume bounds of their short cycles (``graph_volume_bound``, graphs with a
    finite one)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    counts: dict[str, Counter[int]] = {}
    seen_pairs: set[tuple[str, str]] = set()
    n, bounds = 0, []
    for graph in graphs:
        n += 1
        if volume_quantile is not None:
            bounds.append(graph_volume_bound(graph))
        for species, degree in zip(graph.species, node_degrees(graph)):
            counts.setdefault(species, Counter())[degree] += 1
        seen_pairs.update(element_pair(graph.species[i], graph.species[j]) for i, j, *_ in graph.edges)
    if n == 0:
        raise ValueError("cannot learn a coordination table from no graphs")
    limits = {element: max(1, _quantile(counter, quantile)) for element, counter in counts.items()}
    finite = [b for b in bounds if b < math.inf]
    bound = round(float(np.quantile(finite, volume_quantile)), 3) if finite and volume_quantile is not None else None
    return CoordinationTable(limits, frozenset(seen_pairs) if pairs else None, n, quantile, bound)


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
    "DEFAULT_VOLUME_QUANTILE",
    "UNSEEN_MAX_DEGREE",
    "CoordinationTable",
    "bond_length",
    "element_pair",
    "graph_volume_bound",
    "new_cycles",
    "CycleBound",
    "learn_coordination",
    "node_degrees",
]
