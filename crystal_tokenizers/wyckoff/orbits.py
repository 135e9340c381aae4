"""The shared Wyckoff-orbit vocabulary, built from pyxtal's Wyckoff tables and spglib's symmetry database.

Each of the 230 space groups (in pyxtal's standard setting: origin choice 2 where ITA gives two,
hexagonal axes for R groups, unique axis b) lists its Wyckoff positions. A Wyckoff position is the set
of coordinate triples of its orbit (e.g. ``x,x,z  -x,-x,z  ...``). Matra-Genoa (De Breuck et al. 2025)
shares one token among positions whose coordinate triples are identical: the 1,731 positions of the
230 groups reduce to 940 orbit tokens here (counted by :func:`build_orbit_table_data`). A token is named
after the first group that has the orbit: ``wp:4a@225`` is the orbit that is 4a in Fm-3m.

The table ships as the module ``crystal_tokenizers/wyckoff/orbit_table.py`` (JSON text; regenerate with
``python -m crystal_tokenizers.wyckoff.orbits``; a test checks it against pyxtal). The group operations
themselves come from spglib's database (``spglib.get_symmetry_from_database``) for the same Hall setting.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import spglib

from crystal_tokenizers.wyckoff.orbit_table import ORBIT_TABLE_JSON

LATTICE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "cubic": ("a",),
    "hexagonal": ("a", "c"),
    "trigonal": ("a", "c"),
    "tetragonal": ("a", "c"),
    "orthorhombic": ("a", "b", "c"),
    "monoclinic": ("a", "b", "c", "beta"),
    "triclinic": ("a", "b", "c", "alpha", "beta", "gamma"),
}
"""Free lattice parameters of each crystal system in the standard setting (Å, degrees)."""

FREE_PARAMETER_NAMES: tuple[str, str, str] = ("x", "y", "z")


@dataclass(frozen=True)
class WyckoffPosition:
    """One Wyckoff position of one space group, with its representative coordinate triple.

    ``rotation`` (3×3 integers) and ``translation`` (3,) map the free-parameter vector
    ``(x, y, z)`` to the representative fractional position ``rotation @ p + translation``.
    """

    space_group: int
    letter: str
    multiplicity: int
    token: str
    triple: str
    rotation: np.ndarray
    translation: np.ndarray
    free_parameters: tuple[str, ...]

    def position(self, free_values: np.ndarray) -> np.ndarray:
        """Representative fractional position for free values ordered as ``free_parameters``."""
        params = np.zeros(3)
        for name, value in zip(self.free_parameters, free_values):
            params[FREE_PARAMETER_NAMES.index(name)] = value
        return self.rotation @ params + self.translation


@dataclass(frozen=True)
class OrbitTable:
    """Wyckoff positions of all 230 groups and the shared orbit tokens."""

    hall_numbers: dict[int, int]
    positions: dict[int, tuple[WyckoffPosition, ...]]
    tokens: tuple[str, ...]

    def position_by_letter(self, space_group: int, letter: str) -> WyckoffPosition:
        """The Wyckoff position ``letter`` of ``space_group``."""
        for position in self.positions[space_group]:
            if position.letter == letter:
                return position
        raise KeyError(f"space group {space_group} has no Wyckoff position {letter!r}")

    def position_by_token(self, space_group: int, token: str) -> WyckoffPosition | None:
        """The Wyckoff position of ``space_group`` named by an orbit token, or None."""
        for position in self.positions[space_group]:
            if position.token == token:
                return position
        return None


_TERM = re.compile(r"([+-]?)(\d*)([xyz])|([+-]?\d+(?:/\d+)?)")


def parse_triple(triple: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a coordinate triple such as ``x,2x,-z+1/2`` into (rotation 3×3, translation 3)."""
    rows = triple.replace(" ", "").split(",")
    if len(rows) != 3:
        raise ValueError(f"not a coordinate triple: {triple!r}")
    rotation = np.zeros((3, 3), dtype=int)
    translation = np.zeros(3)
    for i, row in enumerate(rows):
        consumed = 0
        for match in _TERM.finditer(row):
            if match.start() != consumed:
                raise ValueError(f"cannot parse {row!r} in {triple!r}")
            consumed = match.end()
            sign, factor, axis, constant = match.groups()
            if axis:
                value = int(factor) if factor else 1
                rotation[i, FREE_PARAMETER_NAMES.index(axis)] += -value if sign == "-" else value
            else:
                num, _, den = constant.partition("/")
                translation[i] += int(num) / (int(den) if den else 1)
        if consumed != len(row):
            raise ValueError(f"cannot parse {row!r} in {triple!r}")
    return rotation, translation


def _free_parameters(rotation: np.ndarray) -> tuple[str, ...]:
    return tuple(name for k, name in enumerate(FREE_PARAMETER_NAMES) if np.any(rotation[:, k]))


def build_orbit_table_data() -> dict[str, Any]:
    """Build the JSON-ready orbit table from pyxtal's Wyckoff tables (slow: imports pyxtal)."""
    from pyxtal.symmetry import Group

    orbit_names: dict[frozenset, str] = {}
    orbits: dict[str, str] = {}
    groups: dict[str, Any] = {}
    for number in range(1, 231):
        group = Group(number)
        entries = []
        for wp in group.Wyckoff_positions:
            ops = []
            for op in wp.ops:
                matrix = op.affine_matrix[:3].copy()
                matrix[:, 3] = np.round(matrix[:, 3] % 1.0, 6) % 1.0
                ops.append(tuple(np.round(matrix.ravel(), 6)))
            key = frozenset(ops)
            if key not in orbit_names:
                name = f"wp:{wp.multiplicity}{wp.letter}@{number}"
                orbit_names[key] = name
                orbits[name] = wp.ops[0].as_xyz_str().replace(" ", "")
            entries.append([wp.letter, wp.multiplicity, orbit_names[key]])
        groups[str(number)] = {"hall_number": int(group.hall_number), "wyckoff": entries}
    return {
        "source": "pyxtal Group(n).Wyckoff_positions; tokens shared when the coordinate triples are identical",
        "n_wyckoff_positions": sum(len(g["wyckoff"]) for g in groups.values()),
        "n_orbit_tokens": len(orbits),
        "orbits": orbits,
        "groups": groups,
    }


@functools.cache
def load_orbit_table() -> OrbitTable:
    """Load the shipped orbit table (parsed once per process; the result is immutable)."""
    data = json.loads(ORBIT_TABLE_JSON)
    triples: dict[str, str] = data["orbits"]
    positions: dict[int, tuple[WyckoffPosition, ...]] = {}
    hall_numbers: dict[int, int] = {}
    for key, group in data["groups"].items():
        number = int(key)
        hall_numbers[number] = group["hall_number"]
        entries = []
        for letter, multiplicity, token in group["wyckoff"]:
            rotation, translation = parse_triple(triples[token])
            rotation.setflags(write=False)
            translation.setflags(write=False)
            entries.append(WyckoffPosition(
                space_group=number, letter=letter, multiplicity=multiplicity, token=token,
                triple=triples[token], rotation=rotation, translation=translation,
                free_parameters=_free_parameters(rotation),
            ))
        positions[number] = tuple(entries)
    return OrbitTable(hall_numbers=hall_numbers, positions=positions, tokens=tuple(sorted(triples)))


@functools.cache
def space_group_operations(space_group: int) -> tuple[np.ndarray, np.ndarray]:
    """All operations (rotations n×3×3, translations n×3) of the conventional cell, centring included."""
    hall = load_orbit_table().hall_numbers[space_group]
    with warnings.catch_warnings():  # spglib 2.x warns about its legacy error handling on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        ops = spglib.get_symmetry_from_database(hall)
    rotations = np.asarray(ops["rotations"], dtype=float)
    translations = np.asarray(ops["translations"], dtype=float)
    rotations.setflags(write=False)
    translations.setflags(write=False)
    return rotations, translations


if __name__ == "__main__":
    from pathlib import Path

    table = build_orbit_table_data()
    target = Path(__file__).resolve().parent / "orbit_table.py"
    module = target.read_text().split("ORBIT_TABLE_JSON = ")[0]
    target.write_text(module + "ORBIT_TABLE_JSON = " + repr(json.dumps(table, separators=(",", ":"), sort_keys=True)) + "\n")
    print(f"{table['n_wyckoff_positions']} Wyckoff positions -> {table['n_orbit_tokens']} orbit tokens -> {target}")
