"""Crystal graph + symmetry operations <-> SLICES / SLICES-PLUS text.

Grammar (whitespace-separated tokens)::

    text    := species+ edge* symop*
    edge    := INDEX INDEX LABEL LABEL LABEL      (canonical form, as in the SLICES-PLUS paper)
             | INDEX INDEX LABEL3                 (SLICES 2.x form, labels joined: ``0 15 -o+``)
    LABEL   := '-' | 'o' | '+'                    (periodic-image offset -1 / 0 / +1)
    symop   := ROW ROW ROW TRANS TRANS TRANS      (rows of the fractional rotation, translation)

Rotation rows and translation codes follow the SLICES-PLUS tables (Wang et al., SLICES-PLUS;
``../shared/data/README.md``): e.g. ``i u y 1s 1s 1s`` is the identity. The symmetry part is
``SpacegroupAnalyzer(structure).get_symmetry_operations()`` in the cell as given (pymatgen defaults:
symprec 0.01, angle tolerance 5 degrees), fractional, each translation component written as the
nearest fraction of the table, duplicate groups dropped, order kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from pymatgen.core import Element, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystal_tokenizers.errors import MalformedSequenceError, SymmetryAnalysisError
from crystal_tokenizers.slices.graph import CrystalGraph, Edge, orient_edge

ENCODE_SYMPREC = 0.01
"""Symmetry tolerance of the published encoder (pymatgen's default), in Å."""
ENCODE_ANGLE_TOLERANCE = 5.0
"""Angle tolerance of the published encoder (pymatgen's default), in degrees."""

OFFSET_LABELS: dict[str, int] = {"-": -1, "o": 0, "+": 1}
_LABEL_OF_OFFSET = {v: k for k, v in OFFSET_LABELS.items()}

ROTATION_ROWS: dict[str, tuple[int, int, int]] = {
    "a": (1, 1, 1), "b": (1, 1, -1), "c": (1, 1, 0), "d": (1, -1, 1), "e": (1, -1, -1),
    "f": (1, -1, 0), "g": (1, 0, 1), "h": (1, 0, -1), "i": (1, 0, 0), "j": (-1, 1, 1),
    "k": (-1, 1, -1), "l": (-1, 1, 0), "m": (-1, -1, 1), "n": (-1, -1, -1), "o1": (-1, -1, 0),
    "p": (-1, 0, 1), "q": (-1, 0, -1), "r": (-1, 0, 0), "s": (0, 1, 1), "t": (0, 1, -1),
    "u": (0, 1, 0), "v": (0, -1, 1), "w": (0, -1, -1), "x": (0, -1, 0), "y": (0, 0, 1),
    "z": (0, 0, -1),
}  # fmt: skip
"""SLICES-PLUS letters of the rotation-matrix rows (``o1`` so as not to clash with the label ``o``)."""
_LETTER_OF_ROW = {v: k for k, v in ROTATION_ROWS.items()}

TRANSLATION_CODES: dict[str, Fraction] = {
    "1s": Fraction(0), "2s": Fraction(1, 2), "3s": Fraction(1, 3), "4s": Fraction(1, 6),
    "5s": Fraction(2, 3), "6s": Fraction(3, 4), "7s": Fraction(1, 4), "8s": Fraction(5, 6),
    "9s": Fraction(1), "10s": Fraction(1, 8), "11s": Fraction(7, 8), "12s": Fraction(5, 8),
    "13s": Fraction(3, 8),
}  # fmt: skip
"""SLICES-PLUS codes of the translation components (fractions of a lattice vector)."""
_CODES = tuple(TRANSLATION_CODES)
_CODE_VALUES = np.array([float(TRANSLATION_CODES[c]) for c in _CODES])

_JOINED_LABELS = re.compile(r"^[-o+]{3}$")
_INDEX = re.compile(r"^\d+$")
ELEMENT_SYMBOLS: tuple[str, ...] = tuple(Element.from_Z(z).symbol for z in range(1, 104))
"""Node species of the vocabulary: H to Lr (Z = 1-103)."""
_ELEMENTS = frozenset(ELEMENT_SYMBOLS)


@dataclass(frozen=True)
class SymOp:
    """A space-group operation on fractional coordinates: x' = rotation @ x + translation."""

    rotation: tuple[tuple[int, int, int], ...]
    translation: tuple[Fraction, Fraction, Fraction]

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """Rotation (3x3 int) and translation (3, float, fractions of the lattice vectors)."""
        return np.array(self.rotation, dtype=int), np.array([float(t) for t in self.translation])

    def tokens(self) -> tuple[str, ...]:
        """The six SLICES-PLUS tokens of this operation."""
        rows = tuple(_LETTER_OF_ROW[r] for r in self.rotation)
        codes = tuple(_CODES[[TRANSLATION_CODES[c] for c in _CODES].index(t)] for t in self.translation)
        return rows + codes


@dataclass(frozen=True)
class SlicesRecord:
    """A parsed SLICES(-PLUS) string: the crystal graph and the (possibly empty) operation list."""

    graph: CrystalGraph
    symops: tuple[SymOp, ...]
    repairs: tuple[str, ...] = ()
    """What a lenient parse (``parse_record(text, lenient=True)``) changed; empty for a well-formed string."""


def nearest_code(value: float) -> str:
    """The translation code whose fraction is nearest to ``value`` (no wrapping, as published)."""
    return _CODES[int(np.argmin(np.abs(_CODE_VALUES - value)))]


def symop_from_matrices(rotation: np.ndarray, translation: np.ndarray, name: str = "structure") -> SymOp:
    """Snap a fractional operation to the SLICES-PLUS tables (SymmetryAnalysisError if a row cannot)."""
    rows = tuple(tuple(int(round(x)) for x in row) for row in rotation)
    for row in rows:
        if row not in _LETTER_OF_ROW:
            raise SymmetryAnalysisError(f"{name}: rotation row {row} has no SLICES-PLUS letter")
    codes = tuple(TRANSLATION_CODES[nearest_code(float(t))] for t in translation)
    return SymOp(rows, codes)  # type: ignore[arg-type]


def symmetry_operations(
    structure: Structure,
    symprec: float = ENCODE_SYMPREC,
    angle_tolerance: float = ENCODE_ANGLE_TOLERANCE,
) -> tuple[SymOp, ...]:
    """The SLICES-PLUS operations of ``structure`` in its own cell, duplicates dropped, order kept."""
    name = structure.composition.reduced_formula
    try:
        ops = SpacegroupAnalyzer(structure, symprec=symprec, angle_tolerance=angle_tolerance).get_symmetry_operations()
    except (TypeError, ValueError) as err:  # spglib returns None on failure
        raise SymmetryAnalysisError(f"{name}: spglib found no symmetry: {err}") from err
    unique: dict[SymOp, None] = {}
    for op in ops:
        unique.setdefault(symop_from_matrices(op.rotation_matrix, op.translation_vector, name), None)
    return tuple(unique)


def format_record(record: SlicesRecord) -> str:
    """Canonical text: species, edges with separate labels, then six tokens per operation."""
    tokens = list(record.graph.species)
    for i, j, *offset in record.graph.edges:
        tokens += [str(i), str(j), *(_LABEL_OF_OFFSET[x] for x in offset)]
    for op in record.symops:
        tokens += op.tokens()
    return " ".join(tokens)


def _token_kind(token: str) -> str:
    """What a token is in the vocabulary, for error messages."""
    if token in _ELEMENTS:
        return "an element symbol"
    if _INDEX.match(token):
        return "a node index"
    if token in OFFSET_LABELS or _JOINED_LABELS.match(token):
        return "an image label"
    if token in ROTATION_ROWS:
        return "a rotation letter"
    if token in TRANSLATION_CODES:
        return "a translation code"
    return "not a SLICES token"


def _parse_edges(
    tokens: Sequence[str], start: int, num_nodes: int, repairs: list[str] | None = None
) -> tuple[list[Edge], int]:
    """Edges from token ``start`` on; with ``repairs`` (lenient), bad edges are dropped and described there."""
    edges: list[Edge] = []
    k = start
    while k < len(tokens) and _INDEX.match(tokens[k]):
        if k + 2 < len(tokens) and _JOINED_LABELS.match(tokens[k + 2]):
            labels, width = list(tokens[k + 2]), 3
        else:
            labels, width = list(tokens[k + 2 : k + 5]), 5
        problem = None
        if k + 1 >= len(tokens) or not _INDEX.match(tokens[k + 1]) or len(labels) != 3:
            problem = f"edge at token {k} is incomplete: {' '.join(tokens[k:k + 5])!r}"
            if k + 1 < len(tokens) and not _INDEX.match(tokens[k + 1]):
                problem += f" (token {k + 1} {tokens[k + 1]!r} is {_token_kind(tokens[k + 1])}, not a node index)"
            elif len(labels) != 3:
                problem += f" (the string ends after {len(labels)} of its 3 image labels)"
            width = next((w for w in range(1, 5) if k + w >= len(tokens) or not _is_edge_token(tokens[k + w], w)), 5)
        elif any(label not in OFFSET_LABELS for label in labels):
            bad = next(label for label in labels if label not in OFFSET_LABELS)
            problem = f"edge at token {k} has invalid image labels {labels} ({bad!r} is {_token_kind(bad)})"
            position = k + 2 + next(w for w, label in enumerate(labels) if label not in OFFSET_LABELS)
            group = tokens[position : position + 6]
            starts_group = len(group) == 6 and all(t in ROTATION_ROWS for t in group[:3]) and all(
                t in TRANSLATION_CODES for t in group[3:])
            starts_next = _INDEX.match(bad) or starts_group
            width = position - k if starts_next else 5  # resume at the next edge or the symmetry part
        else:
            i, j = int(tokens[k]), int(tokens[k + 1])
            offset = tuple(OFFSET_LABELS[label] for label in labels)
            if i >= num_nodes or j >= num_nodes:
                problem = (f"edge {i}-{j} at token {k} names node {max(i, j)}, but the string has {num_nodes} "
                           f"nodes (0-{num_nodes - 1})")
            elif i == j and offset == (0, 0, 0):
                problem = f"edge at token {k} bonds node {i} to itself in the same cell"
            else:
                edges.append(orient_edge((i, j, *offset)))  # type: ignore[arg-type]
        if problem is not None:
            if repairs is None:
                raise MalformedSequenceError(problem)
            repairs.append(f"dropped: {problem}")
        k += width
    return edges, k


def _is_edge_token(token: str, position: int) -> bool:
    """Whether ``token`` can stand at ``position`` (0-4) of an edge."""
    return bool(_INDEX.match(token)) if position < 2 else token in OFFSET_LABELS or bool(_JOINED_LABELS.match(token))


def _parse_symops(tokens: Sequence[str], start: int, repairs: list[str] | None = None) -> tuple[SymOp, ...]:
    """Operations from token ``start`` on; with ``repairs`` (lenient), bad groups are dropped and described there."""
    rest = tokens[start:]
    ops: dict[SymOp, None] = {}
    if len(rest) % 6 and repairs is None:
        stray = next((start + g for g, t in enumerate(rest) if t not in ROTATION_ROWS and t not in TRANSLATION_CODES), None)
        where = f"; token {stray} {tokens[stray]!r} is {_token_kind(tokens[stray])}" if stray is not None else ""
        raise MalformedSequenceError(f"symmetry part (from token {start}) has {len(rest)} tokens, not a multiple of 6{where}")
    for g in range(0, len(rest) - len(rest) % 6, 6):
        group = rest[g : g + 6]
        bad = next((t for t in group[:3] if t not in ROTATION_ROWS), None) or next(
            (t for t in group[3:] if t not in TRANSLATION_CODES), None)
        if bad is not None:
            problem = (f"invalid symmetry group {' '.join(group)!r} at token {start + g} ({bad!r} is {_token_kind(bad)}; "
                       "a group is 3 rotation letters then 3 translation codes)")
            if repairs is None:
                raise MalformedSequenceError(problem)
            repairs.append(f"dropped: {problem}")
            continue
        rotation = tuple(ROTATION_ROWS[t] for t in group[:3])
        ops.setdefault(SymOp(rotation, tuple(TRANSLATION_CODES[t] for t in group[3:])), None)  # type: ignore[arg-type]
    if len(rest) % 6 and repairs is not None:
        repairs.append(f"dropped: the last {len(rest) % 6} tokens of the symmetry part, an incomplete group")
    return tuple(ops)


def parse_record(text: str, lenient: bool = False) -> SlicesRecord:
    """Parse SLICES or SLICES-PLUS text (either edge form); MalformedSequenceError naming the token and why.

    ``lenient=True`` repairs what can be repaired instead of raising: edges that name a node beyond
    the element list, incomplete (dangling) or mislabelled edges, same-cell self-bonds and invalid or
    incomplete symmetry groups are dropped, and nodes left without any bond are removed (the others
    renumbered); each repair is described in ``SlicesRecord.repairs``. A string with no element
    symbols or no usable edge still raises.
    """
    tokens = text.split()
    repairs: list[str] | None = [] if lenient else None
    num_nodes = 0
    while num_nodes < len(tokens) and tokens[num_nodes] in _ELEMENTS:
        num_nodes += 1
    if num_nodes == 0:
        first = tokens[0] if tokens else ""
        raise MalformedSequenceError(f"no element symbols at the start of {text[:40]!r} (token 0 {first!r} is "
                                     f"{_token_kind(first)})")
    edges, end = _parse_edges(tokens, num_nodes, num_nodes, repairs)
    if not edges:
        after = f"; token {end} {tokens[end]!r} is {_token_kind(tokens[end])}" if end < len(tokens) else ""
        raise MalformedSequenceError(f"no edges after the {num_nodes} element symbols{after}")
    symops = _parse_symops(tokens, end, repairs)
    graph = CrystalGraph(tuple(tokens[:num_nodes]), tuple(edges)).canonical()
    if repairs is not None:
        graph = drop_unbonded_nodes(graph, repairs)
    return SlicesRecord(graph, symops, tuple(repairs or ()))


def drop_unbonded_nodes(graph: CrystalGraph, repairs: list[str]) -> CrystalGraph:
    """The graph without its unbonded nodes (the others renumbered in order); the removal noted in ``repairs``."""
    bonded = sorted({k for e in graph.edges for k in e[:2]})
    if len(bonded) == graph.num_nodes:
        return graph
    isolated = sorted(set(range(graph.num_nodes)) - set(bonded))
    repairs.append(f"removed: nodes {isolated} ({' '.join(graph.species[k] for k in isolated)}) have no bonds")
    index = {old: new for new, old in enumerate(bonded)}
    edges = tuple((index[i], index[j], a, b, c) for i, j, a, b, c in graph.edges)
    return CrystalGraph(tuple(graph.species[k] for k in bonded), edges).canonical()


def split_joined_labels(token: str) -> list[str]:
    """``'-o+'`` -> ``['-', 'o', '+']``; any other token unchanged (one-element list)."""
    return list(token) if _JOINED_LABELS.match(token) else [token]
