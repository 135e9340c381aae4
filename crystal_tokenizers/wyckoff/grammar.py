"""Grammar-constrained decoding of the Wyckoff token format (``docs/wyckoff_format.md``).

:class:`WyckoffGrammarLogitsProcessor` is a ``transformers.LogitsProcessor`` that masks every token that
would make the sequence undecodable, so that every finished sample parses into a crystal:

- before ``<sep>`` only ``<sep>`` (conditions come from the prompt); then one ``sg:N`` allowed by the
  ``cs:``/``sg:`` conditions and able to realise the declared composition or element set;
- ``El wp:`` pairs: the orbit must be a Wyckoff position of the group, a fixed orbit (no free
  parameter) is used at most once, pairs come in canonical order (Wyckoff letter, then atomic number),
  elements come from ``<elements>``/``<composition>``, multiplicities never overshoot a declared
  composition and never enter a dead end (the remaining counts stay reachable with the orbits still
  available: an exact search over the fixed orbits plus an unbounded knapsack over the free ones),
  and the cell stays within ``max_atoms`` atoms, ``max_orbits`` orbits and ``max_length`` tokens;
- ``<lat>`` only when the composition is complete, then exactly the lattice labels of the crystal system
  and each orbit's free-parameter labels, each followed by ``<num>``; ``<eos>`` when complete; pad after.

The same object implements ``process_numeric_values`` (the protocol of
``modeling.generation.NumericValuesProcessor``): a numeric model's ``generate`` passes each sampled
value through it, so triclinic angles always form a cell and free coordinates never collapse an orbit
onto a more special position.

State is kept per sequence and advanced incrementally (one token per step); a new prompt resets it.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from crystal_tokenizers.grammar import IncrementalGrammarProcessor
from crystal_tokenizers.wyckoff.codec import (
    COMPOSITION_MARK,
    ELEMENTS,
    ELEMENTS_MARK,
    LAT,
    NUM,
    SEP,
    orbit_positions,
)
from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS, crystal_system
from crystal_tokenizers.wyckoff.orbits import LATTICE_PARAMETERS, WyckoffPosition, load_orbit_table

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATOMS = 80
"""Atoms per conventional cell (MP-20: at most 20 per primitive cell, ×4 for F centring)."""
DEFAULT_MAX_ORBITS = 20
"""Occupied orbits per crystal (each orbit has at least one atom in the primitive cell)."""
MAX_ORBIT_TOKENS = 8
"""Upper bound on the tokens one orbit adds: ``El wp:`` plus three ``label <num>`` pairs."""
ANGLE_MARGIN_DEG = 1.0
"""Distance (degrees) kept from the bounds of a valid lattice angle."""
COORDINATE_NUDGE = 1e-3
"""Step (fractional) by which a coordinate that collapses an orbit is moved."""
_PROBE_VALUES = (0.1234567, 0.2718281, 0.3141592)
"""Generic stand-ins for free parameters not sampled yet, when checking whether an orbit collapses."""
_Z = {symbol: z for z, symbol in enumerate(ELEMENTS, start=1)}


class Phase(Enum):
    """Where a sequence is in the grammar."""

    PREFIX = "prefix"
    SPACE_GROUP = "space group"
    ELEMENT = "element or <lat>"
    ORBIT = "orbit"
    TAIL = "lattice and coordinates"
    DONE = "done"


@dataclass(frozen=True)
class _Site:
    """One Wyckoff position of a group in canonical order (``rank`` 0 is letter ``a``)."""

    rank: int
    position: WyckoffPosition

    @property
    def multiplicity(self) -> int:
        return self.position.multiplicity

    @property
    def fixed(self) -> bool:
        return not self.position.free_parameters


@functools.cache
def _sites(space_group: int) -> tuple[_Site, ...]:
    """Positions of ``space_group`` by rank (letter ``a`` first)."""
    positions = load_orbit_table().positions[space_group]
    return tuple(_Site(rank=i, position=p) for i, p in enumerate(reversed(positions)))


def _usable(site: _Site, rank: int, z_last: int, z: int) -> bool:
    """Whether element ``z`` may occupy ``site`` after an orbit at (``rank``, ``z_last``) in canonical order."""
    return site.rank > rank or (site.rank == rank and not site.fixed and z >= z_last)


@functools.lru_cache(maxsize=1 << 16)
def _free_reachable(space_group: int, rank: int, z_last: int, z: int, limit: int) -> tuple[bool, ...]:
    """``reach[n]``: n atoms of element ``z`` fit on free positions usable after (rank, z_last), n <= limit."""
    multiplicities = sorted({s.multiplicity for s in _sites(space_group) if not s.fixed and _usable(s, rank, z_last, z)})
    reach = [True] + [False] * limit
    for n in range(1, limit + 1):
        reach[n] = any(m <= n and reach[n - m] for m in multiplicities)
    return tuple(reach)


@functools.lru_cache(maxsize=1 << 18)
def composition_reachable(space_group: int, rank: int, z_last: int, remaining: tuple[tuple[int, int], ...]) -> bool:
    """Whether counts ``remaining`` ((Z, n) pairs, conventional cell) can still be placed after (rank, z_last).

    Exact: each fixed orbit of higher rank goes to at most one element (searched with memoisation over
    the remaining counts); what is left must be a sum of free-orbit multiplicities per element.
    """
    remaining = tuple((z, n) for z, n in remaining if n > 0)
    if not remaining:
        return True
    fixed = [s.multiplicity for s in _sites(space_group) if s.fixed and s.rank > rank]
    reach = [_free_reachable(space_group, rank, z_last, z, n) for z, n in remaining]

    @functools.cache
    def assign(index: int, counts: tuple[int, ...]) -> bool:
        if index == len(fixed):
            return all(reach[e][c] for e, c in enumerate(counts))
        if assign(index + 1, counts):
            return True
        m = fixed[index]
        return any(
            c >= m and assign(index + 1, counts[:e] + (c - m,) + counts[e + 1:]) for e, c in enumerate(counts)
        )

    return assign(0, tuple(n for _, n in remaining))


@functools.lru_cache(maxsize=1 << 16)
def min_atoms_to_place(space_group: int, rank: int, z_last: int, missing: tuple[int, ...]) -> float:
    """Fewest atoms that give every element of ``missing`` (atomic numbers) one orbit after (rank, z_last)."""
    sites = _sites(space_group)
    fixed = tuple(sorted(s.multiplicity for s in sites if s.fixed and s.rank > rank))
    cheapest_free = [
        min((s.multiplicity for s in sites if not s.fixed and _usable(s, rank, z_last, z)), default=math.inf)
        for z in missing
    ]

    @functools.cache
    def best(index: int, available: tuple[int, ...]) -> float:
        if index == len(missing):
            return 0
        options = [cheapest_free[index] + best(index + 1, available)]
        options += [
            m + best(index + 1, available[:i] + available[i + 1:])
            for i, m in enumerate(available)
            if i == 0 or available[i - 1] != m
        ]
        return min(options)

    return best(0, fixed)


@dataclass
class _Conditions:
    """Conditions read from the prompt prefix."""

    crystal_system: str | None = None
    space_group: int | None = None
    elements: tuple[str, ...] | None = None
    composition: dict[str, int] | None = None


def parse_conditions(tokens: list[str]) -> _Conditions:
    """Read ``cs:``, ``sg:``, ``<elements>`` and ``<composition>`` conditions from prefix tokens."""
    conditions = _Conditions()
    mode = None
    for i, token in enumerate(tokens):
        if token.startswith("cs:") and token[3:] in CRYSTAL_SYSTEMS:
            conditions.crystal_system, mode = token[3:], None
        elif token.startswith("sg:"):
            conditions.space_group, mode = int(token[3:]), None
        elif token == ELEMENTS_MARK:
            conditions.elements, mode = (), "elements"
        elif token == COMPOSITION_MARK:
            conditions.composition, mode = {}, "composition"
        elif token in _Z and mode == "elements":
            conditions.elements += (token,)
        elif token in _Z and mode == "composition":
            count = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not count.startswith("n:"):
                raise ValueError(f"<composition> element {token} is not followed by a count n:K")
            conditions.composition[token] = conditions.composition.get(token, 0) + int(count[2:])
        elif not token.startswith("n:"):
            mode = None
    return conditions


@dataclass
class _Row:
    """Grammar state of one sequence."""

    phase: Phase = Phase.PREFIX
    prefix: list[str] = field(default_factory=list)
    conditions: _Conditions = field(default_factory=_Conditions)
    space_group: int | None = None
    element: str | None = None
    orbits: list[tuple[str, _Site]] = field(default_factory=list)
    rank: int = -1
    z_last: int = 0
    atoms: int = 0
    free_parameters: int = 0
    tail: list[str] = field(default_factory=list)
    tail_roles: list[tuple[str, int, str]] = field(default_factory=list)
    tail_index: int = 0
    value_columns: dict[tuple[str, int, str], int] = field(default_factory=dict)


class WyckoffGrammarLogitsProcessor(IncrementalGrammarProcessor):
    """Masks tokens that would make a Wyckoff sequence undecodable (see the module docstring).

    Built from a ``WyckoffTokenizer`` (``tok.grammar_processor(**kwargs)``). ``max_length`` is the total
    sequence length passed to ``generate`` (prompt and padding included); with it the grammar closes
    every sequence in time (exact without a composition condition; with a composition, give
    ``max_length`` room for it).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_atoms: int = DEFAULT_MAX_ATOMS,
        max_orbits: int = DEFAULT_MAX_ORBITS,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        if max_atoms < 1 or max_orbits < 1:
            raise ValueError(f"max_atoms and max_orbits must be positive, got {max_atoms}, {max_orbits}")
        vocab = tokenizer.get_vocab()
        self._vocab = vocab
        self._id_to_token = {i: t for t, i in vocab.items()}
        self.max_atoms = max_atoms
        self.max_orbits = max_orbits
        self.max_length = max_length
        self.num_id = vocab[NUM]
        self.sep_id, self.lat_id = vocab[SEP], vocab[LAT]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab["<pad>"]
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vocab["<eos>"]
        self.bos_id = tokenizer.bos_token_id
        self.element_ids = {symbol: vocab[symbol] for symbol in ELEMENTS if symbol in vocab}
        self.elements_by_z = sorted(self.element_ids, key=_Z.__getitem__)
        self.sg_ids = {n: vocab[f"sg:{n}"] for n in range(1, 231) if f"sg:{n}" in vocab}
        self.label_ids = {name: vocab[name] for names in LATTICE_PARAMETERS.values() for name in names}
        self.label_ids.update({name: vocab[name] for name in ("x", "y", "z")})
        self._space_group_cache: dict[tuple[str, int], list[int]] = {}

    # ------------------------------------------------------------------ state
    def _new_row(self) -> _Row:
        return _Row()

    def _advance(self, row: _Row, token_id: int, column: int) -> None:
        """Consume one token (prompt or generated) and move ``row`` to its next phase."""
        if token_id == self.pad_id and row.phase is not Phase.DONE:
            return  # left padding
        if token_id == self.bos_id and row.phase is Phase.PREFIX:
            return
        token = self._id_to_token.get(token_id, "<unk>")
        if row.phase is Phase.PREFIX:
            if token == SEP:
                row.conditions = parse_conditions(row.prefix)
                row.phase = Phase.SPACE_GROUP
            else:
                row.prefix.append(token)
        elif row.phase is Phase.SPACE_GROUP:
            if not token.startswith("sg:"):
                raise ValueError(f"expected sg:N after <sep> at token {column}, found {token!r}")
            row.space_group, row.phase = int(token[3:]), Phase.ELEMENT
        elif row.phase is Phase.ELEMENT:
            if token == LAT:
                self._start_tail(row)
            elif token in _Z:
                row.element, row.phase = token, Phase.ORBIT
            else:
                raise ValueError(f"expected an element or <lat> at token {column}, found {token!r}")
        elif row.phase is Phase.ORBIT:
            site = next((s for s in _sites(row.space_group) if s.position.token == token), None)
            if site is None:
                raise ValueError(f"{token!r} at token {column} is not a Wyckoff position of space group {row.space_group}")
            row.orbits.append((row.element, site))
            row.rank, row.z_last = site.rank, _Z[row.element]
            row.atoms += site.multiplicity
            row.free_parameters += len(site.position.free_parameters)
            row.element, row.phase = None, Phase.ELEMENT
        elif row.phase is Phase.TAIL:
            if token != row.tail[row.tail_index]:
                raise ValueError(f"expected {row.tail[row.tail_index]!r} at token {column}, found {token!r}")
            if token == NUM:
                row.value_columns[row.tail_roles[row.tail_index]] = column
            row.tail_index += 1
            if row.tail_index == len(row.tail):
                row.phase = Phase.DONE

    def _start_tail(self, row: _Row) -> None:
        """After ``<lat>``: the lattice labels, then each orbit's free-parameter labels, each with ``<num>``, then ``<eos>``."""
        roles = [("lattice", 0, name) for name in LATTICE_PARAMETERS[crystal_system(row.space_group)]]
        for index, (_, site) in enumerate(row.orbits):
            roles += [("orbit", index, name) for name in site.position.free_parameters]
        row.tail, row.tail_roles = [], []
        for role in roles:
            row.tail += [role[2], NUM]
            row.tail_roles += [role, role]
        row.tail.append("<eos>")
        row.tail_roles.append(("end", 0, ""))
        row.tail_index, row.phase = 0, Phase.TAIL

    # ------------------------------------------------------------------ allowed tokens
    def _remaining(self, row: _Row) -> dict[str, int] | None:
        composition = row.conditions.composition
        if composition is None:
            return None
        remaining = dict(composition)
        for element, site in row.orbits:
            remaining[element] = remaining.get(element, 0) - site.multiplicity
        return remaining

    def _missing(self, row: _Row) -> tuple[int, ...]:
        placed = {element for element, _ in row.orbits}
        return tuple(sorted(_Z[e] for e in (row.conditions.elements or ()) if e not in placed))

    def _tail_length(self, space_group: int, free_parameters: int) -> int:
        """Tokens from ``<lat>`` to ``<eos>`` inclusive."""
        return 2 + 2 * len(LATTICE_PARAMETERS[crystal_system(space_group)]) + 2 * free_parameters

    def _orbit_allowed(self, row: _Row, element: str, site: _Site, length: int) -> bool:
        """Whether ``element site`` may follow, with the sequence at ``length`` tokens before the pair."""
        z = _Z[element]
        if not _usable(site, row.rank, row.z_last, z):
            return False
        if site.fixed and any(s.rank == site.rank for _, s in row.orbits):
            return False
        remaining = self._remaining(row)
        if remaining is not None:
            if remaining.get(element, 0) < site.multiplicity:
                return False
            remaining[element] -= site.multiplicity
            return composition_reachable(
                row.space_group, site.rank, z, tuple(sorted((_Z[e], n) for e, n in remaining.items()))
            )
        atoms = row.atoms + site.multiplicity
        if atoms > self.max_atoms or len(row.orbits) + 1 > self.max_orbits:
            return False
        if row.conditions.elements is not None and element not in row.conditions.elements:
            return False
        missing = tuple(m for m in self._missing(row) if m != z)
        if missing and (
            len(row.orbits) + 1 + len(missing) > self.max_orbits
            or atoms + min_atoms_to_place(row.space_group, site.rank, z, missing) > self.max_atoms
        ):
            return False
        if self.max_length is not None:
            needed = self._tail_length(row.space_group, row.free_parameters + len(site.position.free_parameters))
            if length + 2 + MAX_ORBIT_TOKENS * len(missing) + needed > self.max_length:
                return False
        return True

    def _space_group_allowed(self, row: _Row, space_group: int, length: int) -> bool:
        conditions = row.conditions
        if conditions.space_group is not None and space_group != conditions.space_group:
            return False
        if conditions.crystal_system is not None and crystal_system(space_group) != conditions.crystal_system:
            return False
        if conditions.composition is not None:
            if not all(e in _Z for e in conditions.composition):
                return False
            return composition_reachable(
                space_group, -1, 0, tuple(sorted((_Z[e], n) for e, n in conditions.composition.items()))
            )
        needed = self._tail_length(space_group, 0) + 1
        if conditions.elements:
            missing = tuple(sorted(_Z[e] for e in conditions.elements))
            if len(missing) > self.max_orbits or min_atoms_to_place(space_group, -1, 0, missing) > self.max_atoms:
                return False
            needed += MAX_ORBIT_TOKENS * len(missing)
        else:
            sites = [s for s in _sites(space_group) if s.multiplicity <= self.max_atoms]
            if not sites:
                return False
            needed += 2 + 2 * min(len(s.position.free_parameters) for s in sites)
        return self.max_length is None or length + needed <= self.max_length

    def _lat_allowed(self, row: _Row) -> bool:
        if not row.orbits:
            return False
        remaining = self._remaining(row)
        if remaining is not None:
            return not any(remaining.values())
        return not self._missing(row)

    def _candidate_elements(self, row: _Row) -> list[str]:
        if row.conditions.composition is not None:
            return sorted(row.conditions.composition, key=_Z.__getitem__)
        if row.conditions.elements is not None:
            return sorted(row.conditions.elements, key=_Z.__getitem__)
        return self.elements_by_z

    def allowed_tokens(self, row: _Row, length: int) -> list[int]:
        """Token ids that may come next for ``row`` at sequence length ``length``."""
        if row.phase is Phase.PREFIX:
            return [self.sep_id]
        if row.phase is Phase.SPACE_GROUP:
            key = (repr(row.conditions), length)
            if key not in self._space_group_cache:
                self._space_group_cache[key] = [
                    i for n, i in self.sg_ids.items() if self._space_group_allowed(row, n, length)
                ]
            return self._space_group_cache[key]
        if row.phase is Phase.ELEMENT:
            allowed = [self.lat_id] if self._lat_allowed(row) else []
            sites = _sites(row.space_group)
            if row.conditions.composition is None and row.conditions.elements is None:
                # Any element works on a site of higher rank; only Z >= z_last may reuse the current one.
                later = any(self._orbit_allowed(row, "Lr", s, length) for s in sites if s.rank > row.rank)
                if later:
                    return allowed + [self.element_ids[e] for e in self.elements_by_z]
                current = [s for s in sites if s.rank == row.rank and self._orbit_allowed(row, "Lr", s, length)]
                return allowed + [self.element_ids[e] for e in self.elements_by_z if current and _Z[e] >= row.z_last]
            for element in self._candidate_elements(row):
                if element in self.element_ids and any(self._orbit_allowed(row, element, s, length) for s in sites):
                    allowed.append(self.element_ids[element])
            return allowed
        if row.phase is Phase.ORBIT:
            return [
                self._wp_id(s) for s in _sites(row.space_group) if self._orbit_allowed(row, row.element, s, length - 1)
            ]
        if row.phase is Phase.TAIL:
            token = row.tail[row.tail_index]
            return [self.eos_id if token == "<eos>" else self.num_id if token == NUM else self.label_ids[token]]
        return [self.pad_id]

    def _wp_id(self, site: _Site) -> int:
        return self._vocab[site.position.token]

    # ------------------------------------------------------------------ values
    def process_numeric_values(
        self, input_ids: torch.LongTensor, numeric_values: torch.FloatTensor, proposals: torch.FloatTensor
    ) -> torch.FloatTensor:
        """Map the value proposed for each ``<num>`` in the last column into its crystallographic domain.

        Angles stay ``ANGLE_MARGIN_DEG`` inside (0, 180) and, for a triclinic gamma, inside the range
        where alpha, beta, gamma form a cell; a coordinate that would collapse its orbit onto a more
        special position (given the earlier coordinates) is moved by ``COORDINATE_NUDGE`` steps.
        """
        self._sync(input_ids)
        values = proposals.clone()
        history = numeric_values.detach().cpu().numpy()
        for index, row in enumerate(self._rows):
            if input_ids[index, -1] != self.num_id or row.phase not in (Phase.TAIL, Phase.DONE):
                continue
            role = row.tail_roles[row.tail_index - 1]
            value = float(proposals[index])
            if not math.isfinite(value):
                continue
            if role[2] in ("alpha", "beta", "gamma"):
                value = self._valid_angle(row, role[2], value, history[index])
            elif role[0] == "orbit":
                value = self._non_collapsing(row, role, value, history[index])
            values[index] = float(value)
        return values

    def _valid_angle(self, row: _Row, name: str, value: float, history: np.ndarray) -> float:
        low, high = ANGLE_MARGIN_DEG, 180.0 - ANGLE_MARGIN_DEG
        if name == "gamma":
            alpha = history[row.value_columns[("lattice", 0, "alpha")]]
            beta = history[row.value_columns[("lattice", 0, "beta")]]
            low = max(low, abs(alpha - beta) + ANGLE_MARGIN_DEG)
            high = min(high, alpha + beta - ANGLE_MARGIN_DEG, 360.0 - alpha - beta - ANGLE_MARGIN_DEG)
            if high < low:
                return 0.5 * (low + high)
        return min(max(value, low), high)

    def _non_collapsing(self, row: _Row, role: tuple[str, int, str], value: float, history: np.ndarray) -> float:
        element, site = row.orbits[role[1]]
        names = site.position.free_parameters
        current = names.index(role[2])
        earlier = [float(history[row.value_columns[("orbit", role[1], name)]]) for name in names[:current]]
        probes = list(_PROBE_VALUES[current + 1: len(names)])
        for step in range(int(1 / COORDINATE_NUDGE)):
            candidate = (value + step * COORDINATE_NUDGE) % 1.0
            if len(orbit_positions(site.position, earlier + [candidate] + probes)) == site.multiplicity:
                return candidate
        logger.warning("no coordinate keeps %s on %s from collapsing", element, site.position.token)
        return value


__all__ = [
    "DEFAULT_MAX_ATOMS",
    "DEFAULT_MAX_ORBITS",
    "Phase",
    "WyckoffGrammarLogitsProcessor",
    "composition_reachable",
    "min_atoms_to_place",
    "parse_conditions",
]
