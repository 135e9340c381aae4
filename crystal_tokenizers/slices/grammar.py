"""Grammar-constrained decoding of SLICES / SLICES-PLUS strings (format in ``slices.codec``).

:class:`SlicesGrammarLogitsProcessor` is a ``transformers.LogitsProcessor`` that masks every token after
which the sequence could no longer become a string that ``parse_record`` accepts and whose graph the
decoder can embed. A sequence is ``<bos>`` (after any left padding), the string's tokens, ``<eos>``;
conditions (crystal system, properties) are model inputs, not tokens. The rules:

- nodes: element symbols, at least one and at most ``max_nodes``; with ``order="canonical"`` in the
  encoder's order (electronegativity, then atomic number: ``slices.graph.canonical_order``);
- edges: five tokens ``i j a b c`` with ``i <= j < nodes`` and labels ``-``/``o``/``+`` only in the three
  offset slots; a loop ``i i`` has a non-zero offset whose first non-zero entry is positive
  (``graph.orient_edge``). ``order="canonical"`` (what ``SlicesPlusTokenizer`` writes): edges strictly
  increasing as integer tuples (so no duplicates). ``order="published"`` (the SLICES-PLUS paper's files):
  ``i`` never decreases, the edges of one node pair are contiguous, their offsets distinct unless
  ``duplicate_edges=True`` (some published strings repeat an edge; the parser drops the copy);
- the end of the edges (``<eos>``, or for SLICES-PLUS the first symmetry group) only once the labelled
  quotient graph is complete: every node bonded, one connected component, and a cycle space of rank 3
  (3-periodic, ``embedding.periodic_rank``). Components are kept in a union-find with offset potentials
  and the cycle space as an integer basis of at most three vectors, updated once per edge. A token is
  allowed only if the graph can still be completed afterwards: every future edge ``(i', j')`` has
  ``i' >= i``, so a component whose nodes all lie below the current ``i`` is frozen; the fewest edges
  still needed are exactly ``(components - 1) + (3 - rank)`` (the exact bound used for ``max_length``).
  ``periodic=False`` only asks that every node be bonded, which is all the encoder guarantees: some
  graphs are disconnected or of rank < 3 (layered and molecular crystals; 248 of the 2,305 of
  ``../shared/data/mp20_sample`` under plain MinimumDistanceNN, 8 of the first 199 bundled sample crystals
  under the adaptive default), and the decoder still embeds many of them;
- SLICES-PLUS (``symmetry=True``): after the edges, six-token groups (three rotation-row letters, three
  translation codes). The first group is the identity ``i u y 1s 1s 1s`` (spglib lists it first, and so
  does every encoded and published string); every rotation is an integer matrix of finite order
  (``R^12 = I``, so ``det R = +-1``; checked when its third row is chosen); no group is repeated; at most
  ``max_symops`` groups (crystal cells as given: the published files reach 192 operations). With
  ``symmetry_check="group"`` the rotations written must close into a finite point group: ``<eos>`` only
  once every product of two written rotations has been written, and a rotation only if the group it
  generates with the written ones stays in the letter table and fits the budget (``slices.rotations``).
  ``symmetry_check="graph"`` (the default) also asks every rotation to be the linear part of an
  automorphism of the written labelled graph (``embedding.graph_automorphism_rotations``; for a
  connected 3-periodic graph), so that the decoder can impose every written operation; ``"none"`` keeps
  only the per-operation rules;
  ``crystal_system`` (with ``"group"``): the group must be one of that crystal system (``slices.systems``):
  a rotation only if the group it generates still lies in a writable group of that system (a memoised
  search), its size bound below by Lagrange in the budget, and ``<eos>`` only at such a closed group;
- coordination (``coordination``, by default the tokenizer's ``CoordinationTable`` learned from training
  strings; ``None`` switches it off): no node above its element's degree limit, no bond between elements
  never bonded in training, and the short-cycle volume bound per atom (loops and two-bond cycles fix
  lattice vectors at about a bond length) not below the table's; an edge is allowed only while enough free
  bonds remain for the edges still needed (per component, a necessary condition). The volume rule is
  dropped for a row it leaves without completion (logged);
- ``max_length`` (the total length passed to ``generate``, prompt and padding included): a token is
  allowed only if the shortest completion after it, ``<eos>`` included, still fits, so every sequence
  closes in time when the budget allows any string at all; ``<pad>`` after ``<eos>``.

State is kept per sequence and advanced one token per step; a new prompt (or batch) resets it.
"""

from __future__ import annotations

import itertools
import logging
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from crystal_tokenizers.grammar import IncrementalGrammarProcessor
from crystal_tokenizers.slices.codec import ELEMENT_SYMBOLS, OFFSET_LABELS, ROTATION_ROWS, TRANSLATION_CODES
from crystal_tokenizers.slices.automorphisms import graph_automorphism_rotations
from crystal_tokenizers.slices.coordination import CoordinationTable, CycleBound, new_cycles
from crystal_tokenizers.slices.graph import CrystalGraph, species_order_key
from crystal_tokenizers.slices.rotations import rotation_algebra
from crystal_tokenizers.slices.systems import (
    CRYSTAL_SYSTEMS,
    reachable_systems,
    rotations_crystal_system,
    smallest_supergroup_order,
)

logger = logging.getLogger(__name__)

ORDERS = ("canonical", "published")
"""Edge orders: the tokenizer's sorted canonical form, or the looser order of the published files."""
SYMMETRY_CHECKS = ("none", "group", "graph")
"""How much the symmetry part is checked: per operation, closure into a point group, and graph automorphisms."""

DEFAULT_MAX_SYMOPS = 192
"""Operations per string: 48 point operations times up to 4 centring translations (published maximum)."""
IDENTITY_TOKENS = ("i", "u", "y", "1s", "1s", "1s")
"""The identity operation, the first group of every SLICES-PLUS string."""

Offset = tuple[int, int, int]
_OFFSETS: tuple[Offset, ...] = tuple(itertools.product((-1, 0, 1), repeat=3))
"""The 27 periodic-image offsets in increasing order."""
_LOOP_OFFSETS: tuple[Offset, ...] = tuple(v for v in _OFFSETS if v > (0, 0, 0))
"""The 13 offsets a loop may carry (first non-zero entry positive)."""
_LABEL_OF = {v: k for k, v in OFFSET_LABELS.items()}
_TRANSLATION_LIMIT = len(TRANSLATION_CODES)
INF = math.inf


class Phase(Enum):
    """Where a sequence is in the grammar."""

    START = "start"
    NODES = "nodes"
    EDGES = "edges"
    SYMOPS = "symmetry operations"
    DONE = "done"


# --------------------------------------------------------------------------------- small integer algebra


def _sub(a: Offset, b: Offset) -> Offset:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _add(a: Offset, b: Offset) -> Offset:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _cross(a: Offset, b: Offset) -> Offset:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def independent(basis: list[Offset], w: Offset) -> bool:
    """Whether the integer vector ``w`` lies outside the span of ``basis`` (0-3 independent vectors)."""
    if len(basis) == 0:
        return w != (0, 0, 0)
    if len(basis) == 1:
        return _cross(basis[0], w) != (0, 0, 0)
    if len(basis) == 2:
        n = _cross(basis[0], basis[1])
        return n[0] * w[0] + n[1] * w[1] + n[2] * w[2] != 0
    return False


def _completes_rank(basis: list[Offset], vectors: list[Offset]) -> bool:
    """Whether ``basis`` together with ``vectors`` spans all three dimensions."""
    basis = list(basis)
    for w in vectors:
        if len(basis) == 3:
            break
        if independent(basis, w):
            basis.append(w)
    return len(basis) == 3


# --------------------------------------------------------------------------------- per-sequence state


@dataclass
class _Row:
    """Grammar state of one sequence."""

    phase: Phase = Phase.START
    species_key: tuple[float, int] | None = None
    num_nodes: int = 0
    comp: list[int] = field(default_factory=list)  # component label (a member node) of every node
    pot: list[Offset] = field(default_factory=list)  # lift of every node relative to its component
    members: dict[int, list[int]] = field(default_factory=dict)
    basis: list[Offset] = field(default_factory=list)  # independent cycle vectors (rank = len)
    uncovered: set[int] = field(default_factory=set)  # nodes without a bond yet
    num_edges: int = 0
    last: tuple[int, int, Offset] | None = None  # last complete edge
    closed: set[int] = field(default_factory=set)  # published order: partners j of earlier pairs (last i, j)
    used: set[Offset] = field(default_factory=set)  # published order: offsets of the current pair
    partial: list[Any] = field(default_factory=list)  # tokens of the edge or group being written
    v_options: list[tuple[Offset, float]] | None = None
    ops: set[tuple[str, ...]] = field(default_factory=set)
    op_prefixes: dict[tuple[str, ...], int] = field(default_factory=dict)
    species: list[str] = field(default_factory=list)
    edges: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    rotations: frozenset[int] = frozenset()  # numbers (``RotationAlgebra``) of the rotations written
    admissible: frozenset[int] | None = None  # rotations allowed at all (graph automorphisms), set lazily
    options: dict[int, int] | None = None  # rotation -> writable group's missing members, for ``rotations``
    degree: list[int] = field(default_factory=list)  # bonds per node so far (a loop counts twice)
    limits: list[int] = field(default_factory=list)  # most bonds per node (coordination table)
    spare: tuple[tuple[int, int, int], dict[int, int], int] | None = None  # ((nodes, edges, i), spare per component, total)
    cycles: CycleBound = CycleBound()  # loops and two-bond cycles and their volume bound (coordination)
    pair_offsets: list[Offset] = field(default_factory=list)  # offsets of the current pair's edges so far
    relaxed: bool = False  # the volume rule was dropped for this row (it left no completion)

    @property
    def components(self) -> int:
        return len(self.members)

    @property
    def rank(self) -> int:
        return len(self.basis)

    def complete(self, periodic: bool) -> bool:
        if periodic:
            return self.num_nodes > 0 and self.components == 1 and self.rank == 3
        return self.num_edges > 0 and not self.uncovered

    def lowest_max(self) -> int:
        """The smallest largest-node index over the components (``i`` may not pass it while others remain)."""
        return min(max(nodes) for nodes in self.members.values())

    def add_node(self) -> None:
        k = self.num_nodes
        self.comp.append(k)
        self.pot.append((0, 0, 0))
        self.members[k] = [k]
        self.uncovered.add(k)
        self.num_nodes += 1

    def add_edge(self, i: int, j: int, v: Offset) -> None:
        self.uncovered.discard(i)
        self.uncovered.discard(j)
        if self.degree:
            self.degree[i] += 1
            self.degree[j] += 1
        ci, cj = self.comp[i], self.comp[j]
        if ci == cj:
            w = _add(_sub(self.pot[i], self.pot[j]), v)
            if len(self.basis) < 3 and independent(self.basis, w):
                self.basis.append(w)
        else:  # relabel the smaller component: p_j = p_i + v
            shift = _sub(_add(self.pot[i], v), self.pot[j])
            keep, gone = (ci, cj) if len(self.members[ci]) >= len(self.members[cj]) else (cj, ci)
            if gone == ci:
                shift = (-shift[0], -shift[1], -shift[2])
            for k in self.members[gone]:
                self.comp[k] = keep
                self.pot[k] = _add(self.pot[k], shift)
            self.members[keep].extend(self.members.pop(gone))
        self.num_edges += 1
        self.edges.append((i, j, *v))


class SlicesGrammarLogitsProcessor(IncrementalGrammarProcessor):
    """Masks tokens that would make a SLICES / SLICES-PLUS sequence unparsable or its graph undecodable.

    Built from a ``SlicesPlusTokenizer`` (``tok.grammar_processor(**kwargs)``). ``symmetry`` defaults to
    the tokenizer's (``False``: plain SLICES, no symmetry groups); ``order`` is ``"canonical"`` for
    models trained on the tokenizer's own strings and ``"published"`` for the paper's files (see the module
    docstring); ``periodic`` asks for a connected, 3-periodic graph (``False``: every node bonded);
    ``max_length`` is the total sequence length passed to ``generate``.
    """

    def __init__(
        self,
        tokenizer: Any,
        symmetry: bool | None = None,
        order: str = "canonical",
        max_nodes: int | None = None,
        max_symops: int = DEFAULT_MAX_SYMOPS,
        max_length: int | None = None,
        duplicate_edges: bool = False,
        periodic: bool = True,
        symmetry_check: str = "graph",
        crystal_system: str | None = None,
        coordination: CoordinationTable | str | None = "tokenizer",
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if symmetry_check not in SYMMETRY_CHECKS:
            raise ValueError(f"symmetry_check must be one of {SYMMETRY_CHECKS}, got {symmetry_check!r}")
        if crystal_system is not None and (crystal_system not in CRYSTAL_SYSTEMS or symmetry_check != "group"):
            raise ValueError(f"crystal_system must be one of {CRYSTAL_SYSTEMS} with symmetry_check='group', "
                             f"got {crystal_system!r} with {symmetry_check!r}")
        self.symmetry_check = symmetry_check
        self.crystal_system = crystal_system
        self.coordination: CoordinationTable | None = (
            getattr(tokenizer, "coordination", None) if coordination == "tokenizer" else coordination  # type: ignore[assignment]
        )
        self.algebra = rotation_algebra()
        vocab = tokenizer.get_vocab()
        self.symmetry = bool(getattr(tokenizer, "symmetry", True) if symmetry is None else symmetry)
        self.order = order
        self.canonical = order == "canonical"
        self.duplicate_edges = duplicate_edges and not self.canonical
        self.index_ids = []
        while str(len(self.index_ids)) in vocab:
            self.index_ids.append(vocab[str(len(self.index_ids))])
        self.max_nodes = min(max_nodes or getattr(tokenizer, "max_nodes", len(self.index_ids)), len(self.index_ids))
        if self.max_nodes < 1 or max_symops < 1:
            raise ValueError(f"max_nodes and max_symops must be positive, got {self.max_nodes}, {max_symops}")
        self.max_symops = max_symops
        self.max_length = max_length
        self.periodic = periodic
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab["<pad>"]
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vocab["<eos>"]
        self.bos_id = tokenizer.bos_token_id
        self._token_of = {i: t for t, i in vocab.items()}
        self._index_of = {token_id: k for k, token_id in enumerate(self.index_ids)}
        self.label_ids = {v: vocab[label] for label, v in OFFSET_LABELS.items()}
        self._offset_of = {token_id: v for v, token_id in self.label_ids.items()}
        self.row_ids = {letter: vocab[letter] for letter in ROTATION_ROWS}
        self._row_id_set = frozenset(self.row_ids.values())
        self.code_ids = {code: vocab[code] for code in TRANSLATION_CODES}
        elements = [(symbol, vocab[symbol]) for symbol in ELEMENT_SYMBOLS if symbol in vocab]
        self._element_key = {token_id: species_order_key(symbol) for symbol, token_id in elements}
        by_key = sorted(self._element_key.items(), key=lambda item: item[1])
        self._sorted_element_ids = [token_id for token_id, _ in by_key]
        self._sorted_element_keys = [key for _, key in by_key]
        self._every_rotation = dict.fromkeys(range(len(self.algebra.triples)), 0)  # "none": nothing goes missing
        self._tail = (len(IDENTITY_TOKENS) if self.symmetry else 0) + 1  # identity group, <eos>
        self._systems: dict[frozenset[int], str] = {}
        self._volume_rule = self.coordination is not None and self.coordination.min_volume_bound is not None
        self._extendable_memo: dict[frozenset[int], bool] = {}

    # ------------------------------------------------------------------ state
    def _new_row(self) -> _Row:
        return _Row()

    def _advance(self, row: _Row, token_id: int, column: int) -> None:
        """Consume one token (prompt or generated)."""
        if row.phase is Phase.DONE:
            return
        if row.phase is Phase.START:
            if token_id in (self.pad_id, self.bos_id):
                return
            row.phase = Phase.NODES
        if token_id == self.eos_id:
            row.phase = Phase.DONE
            return
        if row.phase is Phase.NODES and token_id in self._element_key:
            row.species_key = self._element_key[token_id]
            row.species.append(self._token_of[token_id])
            row.add_node()
            if self.coordination is not None:
                row.degree.append(0)
                row.limits.append(self.coordination.limit(row.species[-1]))
            return
        if row.phase in (Phase.NODES, Phase.EDGES) and not row.partial and token_id in self._row_id_set:
            row.phase = Phase.SYMOPS
        if row.phase is Phase.SYMOPS:
            self._advance_symop(row, token_id, column)
            return
        row.phase = Phase.EDGES
        slot = len(row.partial)
        if slot < 2 and token_id in self._index_of and self._index_of[token_id] < row.num_nodes:
            row.partial.append(self._index_of[token_id])
        elif slot >= 2 and token_id in self._offset_of:
            row.partial.append(self._offset_of[token_id])
        else:
            raise ValueError(f"token {self._token_of.get(token_id)!r} at column {column} cannot be edge slot {slot}")
        if slot == 1:
            row.v_options = None
        if len(row.partial) == 5:
            i, j = row.partial[:2]
            v = tuple(row.partial[2:])
            if i > j or (i == j and v <= (0, 0, 0)):
                raise ValueError(f"edge {i} {j} {v} at column {column} is not oriented canonically")
            if not self.canonical:
                if row.last is not None and i == row.last[0] and j != row.last[1]:
                    row.closed.add(row.last[1])
                elif row.last is None or i != row.last[0]:
                    row.closed = set()
                if row.last is None or (i, j) != row.last[:2]:
                    row.used = set()
                row.used.add(v)
            if self._volume_rule:
                same = row.pair_offsets if row.last is not None and row.last[:2] == (i, j) else []
                fresh = new_cycles(row.species, i, j, v, same)
                if fresh:
                    row.cycles = row.cycles.extended(fresh)
                row.pair_offsets = same + [v]
            row.add_edge(i, j, v)
            row.last = (i, j, v)
            row.partial = []

    def _advance_symop(self, row: _Row, token_id: int, column: int) -> None:
        token = self._token_of.get(token_id, "<unk>")
        slot = len(row.partial)
        if (slot < 3 and token not in ROTATION_ROWS) or (slot >= 3 and token not in TRANSLATION_CODES):
            raise ValueError(f"token {token!r} at column {column} cannot be symmetry slot {slot}")
        row.partial.append(token)
        if len(row.partial) == 6:
            group = tuple(row.partial)
            row.ops.add(group)
            number = self.algebra.number.get(group[:3])
            if number is not None and number not in row.rotations:
                row.rotations = row.rotations | {number}
                row.options = None
            for cut in (4, 5, 6):
                row.op_prefixes[group[:cut]] = row.op_prefixes.get(group[:cut], 0) + 1
            row.partial = []

    # ------------------------------------------------------------------ edge feasibility
    def _need_after(self, row: _Row, i: int, j: int, v: Offset, lowest_max: int) -> float:
        """Fewest edges still needed after adding ``(i, j, v)`` (``inf``: the graph can no longer be completed)."""
        if self._volume_rule and not row.relaxed and not self._dense_enough(row, i, j, v):
            return INF
        return self._with_capacity(row, i, j, self._graph_need_after(row, i, j, v, lowest_max))

    def _dense_enough(self, row: _Row, i: int, j: int, v: Offset) -> bool:
        """Whether the short cycles closed by ``(i, j, v)`` keep the volume bound per atom at or above the
        table's ``min_volume_bound`` (``coordination.volume_bound``)."""
        same = row.pair_offsets if row.last is not None and row.last[:2] == (i, j) else []
        fresh = new_cycles(row.species, i, j, v, same)
        if not fresh:
            return True
        bound = row.cycles.extended(fresh).volume
        return bound / row.num_nodes >= self.coordination.min_volume_bound  # type: ignore[union-attr]

    def _graph_need_after(self, row: _Row, i: int, j: int, v: Offset, lowest_max: int) -> float:
        """``_need_after`` without the coordination limits."""
        if not self.periodic:
            return self._cover_need(row, i, j)
        n = row.num_nodes
        same = row.comp[i] == row.comp[j]
        components = row.components - (not same)
        basis = row.basis
        if same and len(basis) < 3:
            w = _add(_sub(row.pot[i], row.pot[j]), v)
            if independent(basis, w):
                basis = basis + [w]
        if components > 1:
            return (components - 1) + (3 - len(basis)) if i <= lowest_max else INF
        if i < n - 1 or len(basis) == 3:
            return 3 - len(basis)
        # a loop on the last node: only later loops on it remain
        if self.canonical:
            later = [u for u in _LOOP_OFFSETS if u > v]
        else:
            used = row.used if row.last is not None and row.last[:2] == (i, i) else set()
            later = [u for u in _LOOP_OFFSETS if u != v and u not in used]
        if self._volume_rule and not row.relaxed:  # each later loop must keep the volume bound after this edge
            after = row.cycles.extended(new_cycles(row.species, i, i, v, []))
            least = self.coordination.min_volume_bound * row.num_nodes  # type: ignore[union-attr]
            later = [u for u in later if after.extended(new_cycles(row.species, i, i, u, [])).volume >= least]
        return 3 - len(basis) if _completes_rank(basis, later) else INF

    @staticmethod
    def _cover_need(row: _Row, i: int, j: int) -> float:
        """``periodic=False``: edges needed to bond every node after an edge on ``(i, j)``.

        Later edges start at ``i`` or above, so an unbonded node below ``i`` stays unbonded; the others
        are bonded in pairs (a loop for the last one).
        """
        rest = [u for u in row.uncovered if u != i and u != j]
        if rest and min(rest) < i:
            return INF
        return (len(rest) + 1) // 2

    def _nodes_need(self, num_nodes: int) -> int:
        """Edges needed by ``num_nodes`` nodes without edges."""
        return num_nodes + 2 if self.periodic else (num_nodes + 1) // 2

    def _offsets(self, row: _Row, i: int, j: int) -> list[Offset]:
        """Offsets the edge ``(i, j, .)`` may carry after the last edge."""
        base = _LOOP_OFFSETS if i == j else _OFFSETS
        last = row.last
        if last is None or (i, j) != last[:2]:
            return list(base)
        if self.canonical:
            return [v for v in base if v > last[2]]
        return list(base) if self.duplicate_edges else [v for v in base if v not in row.used]

    def _pair_open(self, row: _Row, i: int, j: int) -> bool:
        """Whether a new edge may name the pair ``(i, j)`` (order rules only)."""
        last = row.last
        if last is None or i > last[0]:
            return True
        if i < last[0]:
            return False
        if self.canonical:
            return j >= last[1]
        return j == last[1] or j not in row.closed

    def _pair_need(self, row: _Row, i: int, j: int, lowest_max: int) -> float:
        """Fewest edges needed after an edge on the pair ``(i, j)`` (best offset), within the coordination limits."""
        if not self._bondable(row, i, j):
            return INF
        return self._with_capacity(row, i, j, self._graph_pair_need(row, i, j, lowest_max))

    def _graph_pair_need(self, row: _Row, i: int, j: int, lowest_max: int) -> float:
        """``_pair_need`` before the coordination limits of the free-offset case."""
        last = row.last
        restricted = last is not None and (i, j) == last[:2]
        if not self.periodic:
            return self._cover_need(row, i, j) if not restricted or self._offsets(row, i, j) else INF
        if restricted or i == row.num_nodes - 1 or (i == j and self._volume_rule and not row.relaxed):
            return min((self._need_after(row, i, j, v, lowest_max) for v in self._offsets(row, i, j)), default=INF)
        # free offsets: a merge, or (rank < 3) some offset adds an independent cycle
        same = row.comp[i] == row.comp[j]
        components = row.components - (not same)
        gain = same and row.rank < 3
        if components > 1 and i > lowest_max:
            return INF
        return (components - 1) + (3 - row.rank - gain)

    def _pairs_connect(self, row: _Row) -> bool:
        """Whether the allowed element pairs can join the written nodes into one net at all (checked before
        the first edge; a node whose element may bond to no other written node ends the string otherwise)."""
        if self.coordination is None or self.coordination.pairs is None:
            return True
        species = sorted(set(row.species))
        if len(species) == 1:
            return self.coordination.bonds(species[0], species[0])
        reached, frontier = {species[0]}, [species[0]]
        while frontier:
            a = frontier.pop()
            for b in species:
                if b not in reached and self.coordination.bonds(a, b):
                    reached.add(b)
                    frontier.append(b)
        return len(reached) == len(species)

    def _i_needs(self, row: _Row) -> dict[int, float]:
        if row.num_edges == 0 and not self._pairs_connect(row):
            return {}
        lowest_max = row.lowest_max()
        start = row.last[0] if row.last is not None else 0
        if self.periodic:
            floor = max(0, row.components - 2 + 3 - row.rank)
        else:
            floor = max(0, len(row.uncovered) - 1) // 2
        needs = {}
        for i in range(start, row.num_nodes):
            best = INF
            for j in range(i, row.num_nodes):
                if self._pair_open(row, i, j):
                    best = min(best, self._pair_need(row, i, j, lowest_max))
                    if best <= floor:
                        break  # no edge can do better
            needs[i] = best
        return needs

    # ------------------------------------------------------------------ coordination limits
    def _bondable(self, row: _Row, i: int, j: int) -> bool:
        """Whether one more bond ``(i, j)`` keeps both nodes within their limits and joins an allowed pair."""
        if self.coordination is None:
            return True
        if i == j:
            return row.degree[i] + 2 <= row.limits[i]
        return (row.degree[i] < row.limits[i] and row.degree[j] < row.limits[j]
                and self.coordination.bonds(row.species[i], row.species[j]))

    def _spare(self, row: _Row, i: int) -> tuple[dict[int, int], int]:
        """Bonds still free per component, and in all, on nodes ``>= i`` (the only ends later edges can have)."""
        key = (row.num_nodes, row.num_edges, i)
        if row.spare is None or row.spare[0] != key:
            per: dict[int, int] = dict.fromkeys(row.members, 0)
            for k in range(i, row.num_nodes):
                per[row.comp[k]] += row.limits[k] - row.degree[k]
            row.spare = (key, per, sum(per.values()))
        return row.spare[1], row.spare[2]

    def _with_capacity(self, row: _Row, i: int, j: int, need: float) -> float:
        """``need`` after the bond ``(i, j)``, or ``inf`` when the limits leave too few free bonds for it.

        Every later edge ``(i', j')`` comes after ``(i, j)`` in canonical order, so it takes one free bond at
        each end from nodes ``>= i``, and node ``i`` itself only bonds to nodes ``>= j``: its free bonds count
        only while such a partner has one. With several components (``periodic``) each still needs a free
        bond. A necessary condition from per-component sums (cheap), not a sufficient one.
        """
        if self.coordination is None or need == INF:
            return need
        if not self._bondable(row, i, j):
            return INF
        before, total = self._spare(row, i)
        per = dict(before)
        ci, cj = row.comp[i], row.comp[j]
        per[ci] -= 1
        per[cj] -= 1
        left_i = row.limits[i] - row.degree[i] - (2 if i == j else 1)
        partner = (i == j and left_i >= 2) or any(
            row.limits[m] - row.degree[m] - (m == j) > 0 for m in range(max(j, i + 1), row.num_nodes))
        unusable = 0 if partner else left_i
        per[ci] -= unusable
        if total - 2 - unusable < 2 * need:
            return INF
        if not self.periodic:  # components need not join
            return need
        if ci != cj:
            per[ci] += per.pop(cj)
        if len(per) == 1:
            return need
        return need if min(per.values()) >= 1 else INF

    # ------------------------------------------------------------------ allowed tokens
    def _budget(self, length: int) -> float:
        """Tokens that may follow the one chosen now."""
        return INF if self.max_length is None else self.max_length - length - 1

    def _fits(self, left: int, edges: float, budget: float) -> bool:
        """Whether ``left`` tokens of the current edge, ``edges`` more edges and the tail fit in ``budget``."""
        return edges < INF and left + 5 * edges + self._tail <= budget

    def allowed_tokens(self, row: _Row, length: int) -> list[int]:
        """Token ids that may come next for ``row`` at sequence length ``length``.

        The volume rule is a heuristic whose feasibility test does not look far ahead: where it leaves a
        row no completion, it is dropped for that row (logged) rather than ending the string unfinished.
        """
        allowed = self._allowed_tokens(row, length)
        if not allowed and self._volume_rule and not row.relaxed:
            logger.info("volume rule dropped for a sequence in phase %s (no completion kept it)", row.phase.value)
            row.relaxed, row.v_options = True, None
            allowed = self._allowed_tokens(row, length)
        return allowed

    def _allowed_tokens(self, row: _Row, length: int) -> list[int]:
        budget = self._budget(length)
        if row.phase is Phase.DONE:
            return [self.pad_id]
        if row.phase is Phase.SYMOPS:
            return self._symop_tokens(row, budget)
        allowed: list[int] = []
        slot = len(row.partial)
        if slot == 0:
            if (row.phase in (Phase.START, Phase.NODES) and row.num_nodes < self.max_nodes
                    and self._fits(0, self._nodes_need(row.num_nodes + 1), budget)):
                allowed += self._element_tokens(row)
            if row.complete(self.periodic):
                if self.symmetry:
                    if len(IDENTITY_TOKENS) <= budget:
                        allowed.append(self.row_ids[IDENTITY_TOKENS[0]])
                else:
                    allowed.append(self.eos_id)
            if row.num_nodes:
                allowed += [self.index_ids[i] for i, need in self._i_needs(row).items() if self._fits(4, need, budget)]
            return allowed
        if slot == 1:
            i = row.partial[0]
            lowest_max = row.lowest_max()
            return [
                self.index_ids[j] for j in range(i, row.num_nodes)
                if self._pair_open(row, i, j) and self._fits(3, self._pair_need(row, i, j, lowest_max), budget)
            ]
        if row.v_options is None:
            i, j = row.partial[:2]
            lowest_max = row.lowest_max()
            row.v_options = [(v, self._need_after(row, i, j, v, lowest_max)) for v in self._offsets(row, i, j)]
        prefix = tuple(row.partial[2:])
        labels = {v[slot - 2] for v, need in row.v_options if v[:slot - 2] == prefix and self._fits(4 - slot, need, budget)}
        return [self.label_ids[x] for x in sorted(labels)]

    def _element_tokens(self, row: _Row) -> list[int]:
        if not self.canonical or row.species_key is None:
            return self._sorted_element_ids
        return self._sorted_element_ids[bisect_left(self._sorted_element_keys, row.species_key):]

    def _symop_tokens(self, row: _Row, budget: float) -> list[int]:
        slot = len(row.partial)
        if not row.ops:  # the identity comes first
            return [self.row_ids[IDENTITY_TOKENS[slot]] if slot < 3 else self.code_ids[IDENTITY_TOKENS[slot]]]
        if slot >= 3:
            prefix = tuple(row.partial)
            limit = _TRANSLATION_LIMIT ** (5 - slot)  # groups that share this prefix at most
            return [self.code_ids[code] for code in TRANSLATION_CODES
                    if row.op_prefixes.get((*prefix, code), 0) < limit]
        # a rotation is writable if the group it completes fits: its other missing members, then <eos>
        triples = self.algebra.triples
        prefix = tuple(row.partial)
        letters = {
            triples[number][slot] for number, missing in self._rotation_options(row).items()
            if triples[number][:slot] == prefix and len(row.ops) + 1 + missing <= self.max_symops
            and (5 - slot) + 6 * missing + 1 <= budget
        }
        allowed = [self.row_ids[letter] for letter in ROTATION_ROWS if letter in letters]
        if slot == 0 and (self.symmetry_check == "none" or self._may_end(row.rotations)):
            allowed.append(self.eos_id)
        return allowed

    def _may_end(self, rotations: frozenset[int]) -> bool:
        """Whether the written rotations are a closed group (of the requested crystal system, if any)."""
        if self.algebra.closure(rotations) != rotations:
            return False
        return self.crystal_system is None or self._system(rotations) == self.crystal_system

    def _extendable(self, group: frozenset[int]) -> bool:
        """Whether the closed ``group`` is, or lies in, a writable group of the requested crystal system
        (memoised depth-first search over the groups generated with one more rotation)."""
        if self.crystal_system is None:
            return True
        if group not in self._extendable_memo:
            system = self._system(group)
            found = system == self.crystal_system
            if not found and self.crystal_system in reachable_systems(system):
                members = np.array(sorted(group), dtype=int)
                product = self.algebra.product
                fits = (product[:, members] >= 0).all(axis=1) & (product[members, :] >= 0).all(axis=0)
                fits[members] = False
                seen: set[frozenset[int]] = set()
                for number in np.flatnonzero(fits).tolist():
                    bigger = self.algebra.closure(group | {number})
                    if bigger is None or bigger in seen:
                        continue
                    seen.add(bigger)
                    if self._extendable(bigger):
                        found = True
                        break
            self._extendable_memo[group] = found
        return self._extendable_memo[group]

    def _target_order(self, group: frozenset[int]) -> int:
        """Rotations the finished group will have at least: its own order, or with a requested crystal
        system the smallest order a group of that system containing it can have (Lagrange bound)."""
        if self.crystal_system is None:
            return len(group)
        return smallest_supergroup_order(len(group), self._system(group), self.crystal_system)

    def _system(self, group: frozenset[int]) -> str:
        """Crystal system of a closed group of rotation numbers (memoised)."""
        if group not in self._systems:
            self._systems[group] = rotations_crystal_system(self.algebra.matrices[sorted(group)])
        return self._systems[group]

    def _rotation_options(self, row: _Row) -> dict[int, int]:
        """Writable rotations after ``row.rotations``, each with the number of group members still missing
        once it is written (the group generated with the written rotations, within the admissible ones;
        ``"none"``: every finite-order rotation, nothing missing)."""
        if self.symmetry_check == "none":
            return self._every_rotation
        if row.options is not None:
            return row.options
        if row.admissible is None:
            row.admissible = self._admissible_rotations(row)
        candidates = np.array(sorted(row.admissible), dtype=int)
        written = np.array(sorted(row.rotations), dtype=int)
        product = self.algebra.product
        pairwise = ((product[np.ix_(candidates, written)] >= 0).all(axis=1)
                    & (product[np.ix_(written, candidates)] >= 0).all(axis=0))
        row.options = {}
        for number in candidates[pairwise].tolist():
            members = row.rotations | {number}
            group = self.algebra.closure(members)
            if group is not None and group <= row.admissible and self._extendable(group):
                row.options[number] = self._target_order(group) - len(members)
        return row.options

    def _admissible_rotations(self, row: _Row) -> frozenset[int]:
        """All rotations (``"group"``), or those that act on the written graph (``"graph"``).

        A graph that is not connected and 3-periodic (only with ``periodic=False``) has no equivariant
        placement to read automorphisms from, so every rotation stays admissible.
        """
        everything = range(len(self.algebra.triples))
        if self.symmetry_check == "group" or not row.complete(periodic=True):
            return frozenset(everything)
        graph = CrystalGraph(tuple(row.species), tuple(row.edges))
        acts = graph_automorphism_rotations(graph, self.algebra.matrices)
        return frozenset(k for k in everything if acts[k])


__all__ = [
    "DEFAULT_MAX_SYMOPS",
    "IDENTITY_TOKENS",
    "ORDERS",
    "SYMMETRY_CHECKS",
    "Phase",
    "SlicesGrammarLogitsProcessor",
    "independent",
]
