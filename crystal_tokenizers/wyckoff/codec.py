"""Structure <-> :class:`WyckoffCrystal` <-> tokens: the pure codec behind ``WyckoffTokenizer``.

Encoding analyses the symmetry with spglib (``symprec`` 0.01 by default), takes the standardised
conventional cell in pyxtal's setting of the space group (see :mod:`.orbits`), keeps one representative
per crystallographic orbit (the orbit's Wyckoff position, its element and only its free parameters) and
only the lattice parameters that are free in the crystal system. Decoding applies the group's operations
to each representative. The token format is documented in ``docs/wyckoff_format.md``.

When spglib finds no space group (it returns nothing, e.g. for overlapping atoms), encoding raises
:class:`SymmetryAnalysisError`; it never falls back to P1 silently. Pass a larger ``symprec`` to
accept noisier structures.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import spglib
from pymatgen.core import Element, Lattice, Structure

from crystal_tokenizers.errors import (
    CompositionMismatchError,
    DisorderedStructureError,
    InvalidLatticeError,
    InvalidStructureError,
    InvalidWyckoffError,
    MalformedSequenceError,
    SymmetryAnalysisError,
    UnsupportedElementError,
)
from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS, crystal_system
from crystal_tokenizers.wyckoff.orbits import (
    FREE_PARAMETER_NAMES,
    LATTICE_PARAMETERS,
    WyckoffPosition,
    load_orbit_table,
    space_group_operations,
)

DEFAULT_SYMPREC = 0.01
"""spglib distance tolerance for encoding (Å), as in Matra-Genoa and pymatgen's SpacegroupAnalyzer."""
STABILITY_THRESHOLD_EV = 0.075
"""``e_above_hull`` below this (eV/atom) is ``stab:low`` (Matra-Genoa)."""
MAX_COUNT = 192
"""Largest per-element count in a ``<composition>`` condition (the largest multiplicity, Fm-3m 192l)."""
DEFAULT_PROPERTY_NAMES: tuple[str, ...] = (
    "formation_energy_per_atom", "band_gap", "e_above_hull", "bulk_modulus", "shear_modulus",
)
ELEMENTS: tuple[str, ...] = tuple(Element.from_Z(z).symbol for z in range(1, 104))
"""Element tokens: H (Z=1) to Lr (Z=103)."""
_Z = {symbol: z for z, symbol in enumerate(ELEMENTS, start=1)}

SEP, LAT, NUM = "<sep>", "<lat>", "<num>"
ELEMENTS_MARK, COMPOSITION_MARK = "<elements>", "<composition>"
ANGLE_NAMES = ("alpha", "beta", "gamma")
LENGTH_NAMES = ("a", "b", "c")
_FIXED_ANGLES = {  # angles (alpha, beta, gamma) that are not free in each crystal system, degrees
    "cubic": (90.0, 90.0, 90.0), "tetragonal": (90.0, 90.0, 90.0), "orthorhombic": (90.0, 90.0, 90.0),
    "hexagonal": (90.0, 90.0, 120.0), "trigonal": (90.0, 90.0, 120.0), "monoclinic": (90.0, None, 90.0),
    "triclinic": (None, None, None),
}
_COORDINATE_MATCH_TOLERANCE = 0.02
"""Largest fractional mismatch accepted when placing a standardised atom on its Wyckoff representative."""
_SAME_SITE_TOLERANCE = 1e-4
"""Fractional distance below which two images of a representative are the same site."""


@dataclass(frozen=True)
class Orbit:
    """One occupied Wyckoff position: element, orbit token and free parameters (fractional)."""

    element: str
    token: str
    free_values: tuple[float, ...]


@dataclass(frozen=True)
class WyckoffCrystal:
    """A crystal as space group + occupied orbits + free lattice parameters (Å, degrees)."""

    space_group: int
    orbits: tuple[Orbit, ...]
    lattice_values: tuple[float, ...]

    @property
    def crystal_system(self) -> str:
        """The crystal system of the space group."""
        return crystal_system(self.space_group)

    def composition(self) -> dict[str, int]:
        """Element counts in the conventional cell (multiplicities summed per element)."""
        table = load_orbit_table()
        counts: dict[str, int] = {}
        for orbit in self.orbits:
            position = table.position_by_token(self.space_group, orbit.token)
            if position is None:
                raise InvalidWyckoffError(f"{orbit.token} is not a Wyckoff position of space group {self.space_group}")
            counts[orbit.element] = counts.get(orbit.element, 0) + position.multiplicity
        return counts


@dataclass(frozen=True)
class Conditions:
    """Optional generation conditions written as the token prefix (decoding ignores them)."""

    crystal_system: str | None = None
    space_group: int | None = None
    elements: tuple[str, ...] | None = None
    composition: tuple[tuple[str, int], ...] | None = None
    stability: str | None = None
    properties: tuple[tuple[str, float], ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------------------
# Structure -> WyckoffCrystal
# ----------------------------------------------------------------------------------------------

def _validate_structure(structure: Structure) -> None:
    if not isinstance(structure, Structure):
        raise InvalidStructureError(f"expected a pymatgen Structure, got {type(structure).__name__}")
    if len(structure) == 0:
        raise InvalidStructureError("the structure has no sites")
    matrix = structure.lattice.matrix
    if not np.all(np.isfinite(matrix)) or not np.all(np.isfinite(structure.frac_coords)):
        raise InvalidStructureError("the lattice or the coordinates contain NaN or infinite values")
    if abs(structure.lattice.volume) < 1e-6:
        raise InvalidStructureError(f"the lattice is degenerate (volume {structure.lattice.volume:.3g} Å³)")
    if not structure.is_ordered:
        raise DisorderedStructureError(
            "the structure has partial occupancies or mixed species on a site; "
            "order it first (e.g. pymatgen's OrderDisorderedStructureTransformation)"
        )
    for site in structure:
        symbol = getattr(site.specie, "symbol", str(site.specie))
        element = getattr(site.specie, "element", None)
        symbol = element.symbol if element is not None else symbol
        if symbol not in _Z:
            raise UnsupportedElementError(f"species {site.specie!s} is not an element H..Lr")


def _analyse(structure: Structure, symprec: float, angle_tolerance: float):
    cell = (structure.lattice.matrix, structure.frac_coords % 1.0,
            [_Z[site.specie.element.symbol if hasattr(site.specie, "element") else site.specie.symbol]
             for site in structure])
    table = load_orbit_table()
    try:
        with warnings.catch_warnings():  # spglib 2.x warns about its legacy None-on-failure mode
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance)
            if dataset is not None and dataset.hall_number != table.hall_numbers[dataset.number]:
                # pyxtal's setting (origin choice 2) differs from spglib's default for 24 groups.
                dataset = spglib.get_symmetry_dataset(
                    cell, symprec=symprec, angle_tolerance=angle_tolerance,
                    hall_number=table.hall_numbers[dataset.number],
                )
    except Exception as err:  # spglib raises SpglibError in some versions, returns None in others
        raise SymmetryAnalysisError(f"spglib failed at symprec={symprec} Å: {err}") from err
    if dataset is None:
        raise SymmetryAnalysisError(
            f"spglib found no space group at symprec={symprec} Å; "
            "check for overlapping atoms or pass a larger symprec"
        )
    return dataset


def _wrap(values: np.ndarray) -> np.ndarray:
    """Wrap fractional values to [0, 1), mapping values that round to 1.0 onto 0.0."""
    wrapped = np.mod(values, 1.0)
    wrapped[np.round(wrapped, 6) >= 1.0] = 0.0
    return wrapped


def _solve_free_values(position: WyckoffPosition, site: np.ndarray) -> tuple[np.ndarray, float]:
    """Free parameters placing ``position``'s representative on ``site`` (mod 1), and the mismatch."""
    rotation, translation = position.rotation, position.translation
    params = np.zeros(3)
    delta = site - translation
    for name in position.free_parameters:
        k = FREE_PARAMETER_NAMES.index(name)
        rows = [i for i in range(3) if abs(rotation[i, k]) == 1 and np.count_nonzero(rotation[i]) == 1]
        row = rows[0] if rows else int(np.flatnonzero(rotation[:, k])[0])
        params[k] = delta[row] / rotation[row, k]
    params = _wrap(params)
    residual = rotation @ params + translation - site
    mismatch = float(np.max(np.abs(residual - np.round(residual)))) if len(residual) else 0.0
    return params, mismatch


def _canonical_free_values(position: WyckoffPosition, sites: np.ndarray) -> tuple[float, ...]:
    """The lexicographically smallest free parameters among the orbit members that fit the representative."""
    candidates = []
    best_mismatch = math.inf
    for site in sites:
        params, mismatch = _solve_free_values(position, site)
        best_mismatch = min(best_mismatch, mismatch)
        if mismatch < _COORDINATE_MATCH_TOLERANCE:
            candidates.append(tuple(
                round(float(params[FREE_PARAMETER_NAMES.index(name)]), 6) % 1.0 for name in position.free_parameters
            ))
    if not candidates:
        raise SymmetryAnalysisError(
            f"no member of the {position.multiplicity}{position.letter} orbit of space group "
            f"{position.space_group} fits its representative {position.triple} (mismatch {best_mismatch:.3g})"
        )
    return min(candidates)


def _orbit_sort_key(space_group: int, orbit: Orbit) -> tuple:
    positions = load_orbit_table().positions[space_group]
    index = next(i for i, p in enumerate(positions) if p.token == orbit.token)
    return (-index, _Z[orbit.element], orbit.free_values)


def structure_to_crystal(
    structure: Structure, symprec: float = DEFAULT_SYMPREC, angle_tolerance: float = -1.0
) -> WyckoffCrystal:
    """Analyse ``structure`` with spglib and express it as Wyckoff orbits in the standard setting."""
    _validate_structure(structure)
    dataset = _analyse(structure, symprec, angle_tolerance)
    table = load_orbit_table()
    space_group = int(dataset.number)

    # Map every standardised atom to the orbit (and Wyckoff letter) of an input atom.
    primitive_to_input = {}
    for i, p in enumerate(dataset.mapping_to_primitive):
        primitive_to_input.setdefault(int(p), i)
    orbit_sites: dict[int, list[np.ndarray]] = {}
    orbit_elements: dict[int, str] = {}
    for std_index, p in enumerate(dataset.std_mapping_to_primitive):
        representative = int(dataset.crystallographic_orbits[primitive_to_input[int(p)]])
        orbit_sites.setdefault(representative, []).append(dataset.std_positions[std_index])
        orbit_elements[representative] = ELEMENTS[int(dataset.std_types[std_index]) - 1]

    orbits = []
    for representative, sites in orbit_sites.items():
        position = table.position_by_letter(space_group, dataset.wyckoffs[representative])
        if len(sites) != position.multiplicity:
            raise SymmetryAnalysisError(
                f"orbit {position.multiplicity}{position.letter} of space group {space_group} has "
                f"{len(sites)} atoms in the standardised cell"
            )
        free_values = _canonical_free_values(position, np.asarray(sites)) if position.free_parameters else ()
        orbits.append(Orbit(element=orbit_elements[representative], token=position.token, free_values=free_values))
    orbits.sort(key=lambda orbit: _orbit_sort_key(space_group, orbit))

    lattice = Lattice(dataset.std_lattice)
    system = crystal_system(space_group)
    all_parameters = dict(zip(LENGTH_NAMES + ANGLE_NAMES, lattice.parameters))
    lattice_values = tuple(float(all_parameters[name]) for name in LATTICE_PARAMETERS[system])
    return WyckoffCrystal(space_group=space_group, orbits=tuple(orbits), lattice_values=lattice_values)


# ----------------------------------------------------------------------------------------------
# WyckoffCrystal -> Structure
# ----------------------------------------------------------------------------------------------

def lattice_from_values(system: str, values: Sequence[float]) -> Lattice:
    """Build the conventional lattice of ``system`` from its free parameters (Å, degrees)."""
    names = LATTICE_PARAMETERS[system]
    if len(values) != len(names):
        raise InvalidLatticeError(f"{system} needs {len(names)} lattice parameters {names}, got {len(values)}")
    given = dict(zip(names, (float(v) for v in values)))
    if not all(math.isfinite(v) for v in given.values()):
        raise InvalidLatticeError(f"non-finite lattice parameter in {given}")
    a = given["a"]
    b = given.get("b", a)
    c = given.get("c", a)
    if min(a, b, c) <= 0:
        raise InvalidLatticeError(f"lattice lengths must be positive, got a={a}, b={b}, c={c} Å")
    angles = [given.get(name, fixed) for name, fixed in zip(ANGLE_NAMES, _FIXED_ANGLES[system])]
    if not all(0.0 < angle < 180.0 for angle in angles):
        raise InvalidLatticeError(f"lattice angles must lie in (0, 180) degrees, got {angles}")
    cosines = np.cos(np.radians(angles))
    volume_factor = 1 - np.sum(cosines**2) + 2 * np.prod(cosines)
    if volume_factor <= 1e-6:
        raise InvalidLatticeError(f"angles {angles} do not form a cell (zero or imaginary volume)")
    return Lattice.from_parameters(a, b, c, *angles)


def orbit_positions(position: WyckoffPosition, free_values: Sequence[float]) -> np.ndarray:
    """All distinct fractional positions (in [0, 1)) of an orbit in the conventional cell."""
    rotations, translations = space_group_operations(position.space_group)
    representative = position.position(np.asarray(free_values, dtype=float))
    images = np.mod(np.einsum("nij,j->ni", rotations, representative) + translations, 1.0)
    difference = images[:, None, :] - images[None, :, :]
    same = np.all(np.abs(difference - np.round(difference)) < _SAME_SITE_TOLERANCE, axis=-1)
    return images[~np.any(np.tril(same, k=-1), axis=1)]


def crystal_to_structure(crystal: WyckoffCrystal) -> Structure:
    """Rebuild the conventional-cell ``Structure`` of ``crystal``; raises ``CrystalDecodeError``."""
    if not 1 <= crystal.space_group <= 230:
        raise MalformedSequenceError(f"space group {crystal.space_group} is not in 1..230")
    if not crystal.orbits:
        raise MalformedSequenceError("the crystal has no occupied orbit")
    table = load_orbit_table()
    lattice = lattice_from_values(crystal.crystal_system, crystal.lattice_values)
    species: list[str] = []
    coords: list[np.ndarray] = []
    used_fixed: set[str] = set()
    for orbit in crystal.orbits:
        position = table.position_by_token(crystal.space_group, orbit.token)
        if position is None:
            raise InvalidWyckoffError(f"{orbit.token} is not a Wyckoff position of space group {crystal.space_group}")
        if len(orbit.free_values) != len(position.free_parameters):
            raise MalformedSequenceError(
                f"{orbit.token} in space group {crystal.space_group} needs free parameters "
                f"{position.free_parameters}, got {len(orbit.free_values)} values"
            )
        if not all(math.isfinite(v) for v in orbit.free_values):
            raise MalformedSequenceError(f"non-finite coordinate for {orbit.element} on {orbit.token}")
        if not position.free_parameters:
            if orbit.token in used_fixed:
                raise InvalidWyckoffError(f"fixed orbit {orbit.token} is occupied twice in space group {crystal.space_group}")
            used_fixed.add(orbit.token)
        sites = orbit_positions(position, orbit.free_values)
        if len(sites) != position.multiplicity:
            raise InvalidWyckoffError(
                f"{orbit.element} on {position.multiplicity}{position.letter} ({orbit.token}) of space group "
                f"{crystal.space_group} with free values {orbit.free_values} collapses to {len(sites)} sites"
            )
        species.extend([orbit.element] * len(sites))
        coords.extend(sites)
    return Structure(lattice, species, np.asarray(coords))


# ----------------------------------------------------------------------------------------------
# WyckoffCrystal <-> tokens
# ----------------------------------------------------------------------------------------------

def format_value(value: float, kind: str) -> str:
    """Decimal literal for a value of ``kind`` (6 decimals, angles 4), exact to 1e-4 after parsing."""
    return f"{value:.4f}" if kind == "angle" else f"{value:.6f}"


def conditions_to_tokens(conditions: Conditions) -> list[str | float]:
    """Condition prefix tokens (without ``<sep>``); numeric property values stay floats."""
    tokens: list[str | float] = []
    if conditions.crystal_system is not None:
        if conditions.crystal_system not in CRYSTAL_SYSTEMS:
            raise ValueError(f"unknown crystal system {conditions.crystal_system!r}; use one of {CRYSTAL_SYSTEMS}")
        tokens.append(f"cs:{conditions.crystal_system}")
    if conditions.space_group is not None:
        if not 1 <= int(conditions.space_group) <= 230:
            raise ValueError(f"space group {conditions.space_group} is not in 1..230")
        tokens.append(f"sg:{int(conditions.space_group)}")
    if conditions.elements is not None:
        tokens.append(ELEMENTS_MARK)
        tokens.extend(sorted(conditions.elements, key=_element_z))
    if conditions.composition is not None:
        tokens.append(COMPOSITION_MARK)
        for element, count in sorted(conditions.composition, key=lambda item: _element_z(item[0])):
            if not 1 <= int(count) <= MAX_COUNT:
                raise ValueError(f"count {count} of {element} is not in 1..{MAX_COUNT}")
            tokens.extend([element, f"n:{int(count)}"])
    if conditions.stability is not None:
        if conditions.stability not in ("low", "high"):
            raise ValueError(f"stability must be 'low' or 'high', got {conditions.stability!r}")
        tokens.append(f"stab:{conditions.stability}")
    for name, value in conditions.properties:
        tokens.extend([f"prop:{name}", float(value)])
    return tokens


def _element_z(symbol: str) -> int:
    if symbol not in _Z:
        raise ValueError(f"unknown element {symbol!r}")
    return _Z[symbol]


def crystal_to_tokens(crystal: WyckoffCrystal) -> list[str | float]:
    """Body tokens of ``crystal`` (from ``sg:N`` to the last coordinate); values stay floats."""
    table = load_orbit_table()
    tokens: list[str | float] = [f"sg:{crystal.space_group}"]
    for orbit in crystal.orbits:
        tokens.extend([orbit.element, orbit.token])
    tokens.append(LAT)
    for name, value in zip(LATTICE_PARAMETERS[crystal.crystal_system], crystal.lattice_values):
        tokens.extend([name, float(value)])
    for orbit in crystal.orbits:
        position = table.position_by_token(crystal.space_group, orbit.token)
        for name, value in zip(position.free_parameters, orbit.free_values):
            tokens.extend([name, float(value)])
    return tokens


def tokens_to_text(tokens: Sequence[str | float]) -> str:
    """Join tokens into the text form, writing values as decimal literals (kind from the label before)."""
    words = []
    previous = ""
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
            previous = token
        else:
            words.append(format_value(float(token), value_kind(previous)))
    return " ".join(words)


def value_kind(label: str) -> str:
    """Kind of the value that follows the label token ``label``."""
    if label in FREE_PARAMETER_NAMES:
        return "fractional"
    if label in LENGTH_NAMES:
        return "length"
    if label in ANGLE_NAMES:
        return "angle"
    return "scalar"


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf)$", re.IGNORECASE)


def is_number_literal(word: str) -> bool:
    """Whether a text word is a numeric literal (it becomes a ``<num>`` token)."""
    return bool(_NUMBER.match(word))


def text_to_tokens(text: str) -> list[str | float]:
    """Split text on whitespace; numeric literals become floats."""
    return [float(word) if is_number_literal(word) else word for word in text.split()]


def _take_value(tokens: Sequence[str | float], index: int, label: str) -> float:
    if index >= len(tokens) or tokens[index] != label:
        found = tokens[index] if index < len(tokens) else "the end"
        raise MalformedSequenceError(f"expected label {label!r} at token {index}, found {found!r}")
    if index + 1 >= len(tokens) or isinstance(tokens[index + 1], str):
        raise MalformedSequenceError(f"label {label!r} at token {index} is not followed by a value")
    value = float(tokens[index + 1])
    if not math.isfinite(value):
        raise MalformedSequenceError(f"value of {label!r} at token {index + 1} is not finite")
    return value


def tokens_to_crystal(tokens: Sequence[str | float]) -> WyckoffCrystal:
    """Parse tokens (values as floats; specials and condition prefix allowed) into a crystal."""
    body = [t for t in tokens if t not in ("<bos>", "<pad>")]
    if "<eos>" in body:
        body = body[: body.index("<eos>")]
    if SEP in body:
        body = body[body.index(SEP) + 1:]
    if not body:
        raise MalformedSequenceError("empty sequence: no space group token")
    head = body[0]
    if not (isinstance(head, str) and head.startswith("sg:") and head[3:].isdigit() and 1 <= int(head[3:]) <= 230):
        raise MalformedSequenceError(f"the body must start with a space group token sg:1..sg:230, found {head!r}")
    space_group = int(head[3:])
    table = load_orbit_table()
    index = 1
    elements_and_tokens: list[tuple[str, WyckoffPosition]] = []
    while index < len(body) and body[index] != LAT:
        element = body[index]
        if not isinstance(element, str) or element not in _Z:
            raise MalformedSequenceError(f"expected an element symbol at token {index}, found {element!r}")
        if index + 1 >= len(body):
            raise MalformedSequenceError(f"element {element} at token {index} has no orbit token")
        token = body[index + 1]
        if not isinstance(token, str) or not token.startswith("wp:"):
            raise MalformedSequenceError(f"expected an orbit token wp:… at token {index + 1}, found {token!r}")
        position = table.position_by_token(space_group, token)
        if position is None:
            raise InvalidWyckoffError(f"{token} is not a Wyckoff position of space group {space_group}")
        elements_and_tokens.append((element, position))
        index += 2
    if index >= len(body):
        raise MalformedSequenceError("missing <lat>: the sequence ends inside the orbit list")
    if not elements_and_tokens:
        raise MalformedSequenceError("no occupied orbit before <lat>")
    index += 1
    system = crystal_system(space_group)
    lattice_values = []
    for name in LATTICE_PARAMETERS[system]:
        lattice_values.append(_take_value(body, index, name))
        index += 2
    orbits = []
    for element, position in elements_and_tokens:
        values = []
        for name in position.free_parameters:
            values.append(_take_value(body, index, name))
            index += 2
        orbits.append(Orbit(element=element, token=position.token, free_values=tuple(values)))
    if index != len(body):
        raise MalformedSequenceError(f"unexpected trailing tokens from token {index}: {body[index:index + 4]!r}")
    return WyckoffCrystal(space_group=space_group, orbits=tuple(orbits), lattice_values=tuple(lattice_values))


def conditions_for_structure(
    structure: Structure,
    crystal: WyckoffCrystal,
    crystal_system: str | bool | None = None,
    space_group: int | bool | None = None,
    elements: Sequence[str] | bool | None = None,
    composition: dict[str, int] | bool | None = None,
    stability: str | None = None,
    e_above_hull: float | None = None,
    properties: dict[str, float] | None = None,
) -> Conditions:
    """Resolve condition arguments; ``True`` takes the value from the analysed crystal."""
    if stability is None and e_above_hull is not None:
        stability = "low" if e_above_hull < STABILITY_THRESHOLD_EV else "high"
    if composition is True:
        resolved_composition = tuple(crystal.composition().items())
    elif composition:
        resolved_composition = tuple((str(k), int(v)) for k, v in dict(composition).items())
    else:
        resolved_composition = None
    if elements is True:
        resolved_elements = tuple(sorted({orbit.element for orbit in crystal.orbits}, key=_element_z))
    else:
        resolved_elements = tuple(elements) if elements else None
    return Conditions(
        crystal_system=crystal.crystal_system if crystal_system is True else (crystal_system or None),
        space_group=crystal.space_group if space_group is True else (space_group or None),
        elements=resolved_elements,
        composition=resolved_composition,
        stability=stability,
        properties=tuple((str(k), float(v)) for k, v in (properties or {}).items()),
    )


def check_composition(crystal: WyckoffCrystal, expected: dict[str, int]) -> None:
    """Raise ``CompositionMismatchError`` unless the conventional-cell counts equal ``expected``."""
    found = crystal.composition()
    if found != dict(expected):
        raise CompositionMismatchError(f"site multiplicities give {found}, the declared composition is {dict(expected)}")
