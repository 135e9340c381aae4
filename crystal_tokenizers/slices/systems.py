"""The crystal system of a point group of integer rotations, in any basis (no standard setting needed).

spglib identifies the point group of a rotation set (``spglib.get_pointgroup``, any lattice basis); its
number (1–32, International Tables order) fixes the crystal system. Also the group-subgroup reach between
systems and the point-group orders that bound a group the grammar may still grow.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import spglib

from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS

_REACHABLE: dict[str, frozenset[str]] = {
    "cubic": frozenset({"cubic"}),
    "hexagonal": frozenset({"hexagonal"}),
    "trigonal": frozenset({"trigonal", "hexagonal", "cubic"}),
    "tetragonal": frozenset({"tetragonal", "cubic"}),
    "orthorhombic": frozenset({"orthorhombic", "tetragonal", "hexagonal", "cubic"}),
    "monoclinic": frozenset(set(CRYSTAL_SYSTEMS) - {"triclinic"}),
    "triclinic": frozenset(CRYSTAL_SYSTEMS),
}
"""Crystal systems of the point groups that contain a point group of the key's system (group-subgroup
relations of the 32 point groups, International Tables A, Fig. 10.1.3.2)."""


POINT_GROUP_ORDERS: dict[str, tuple[int, ...]] = {
    "cubic": (12, 24, 48), "hexagonal": (6, 12, 24), "trigonal": (3, 6, 12), "tetragonal": (4, 8, 16),
    "orthorhombic": (4, 8), "monoclinic": (2, 4), "triclinic": (1, 2),
}  # fmt: skip
"""Orders of the point groups of each crystal system."""


def smallest_supergroup_order(order: int, system: str, target: str) -> int:
    """A lower bound on the order of a point group of ``target`` that contains a group of ``order`` and
    ``system``: the group's own order if the systems agree, else the smallest larger multiple of it
    among ``target``'s orders (Lagrange)."""
    if system == target:
        return order
    return min((n for n in POINT_GROUP_ORDERS[target] if n > order and n % order == 0), default=order)


def reachable_systems(system: str) -> frozenset[str]:
    """Crystal systems a point group of ``system`` can grow into by adding rotations (itself included)."""
    return _REACHABLE[system]


_LAST_POINT_GROUP: tuple[tuple[int, str], ...] = (
    (2, "triclinic"), (5, "monoclinic"), (8, "orthorhombic"), (15, "tetragonal"), (20, "trigonal"),
    (27, "hexagonal"), (32, "cubic"),
)
"""The last point-group number (International Tables order 1–32) of each crystal system."""


def rotations_crystal_system(rotations: Iterable[np.ndarray]) -> str:
    """Crystal system of the point group ``rotations`` (3x3 integer matrices, any lattice basis), by spglib."""
    matrices = np.array([np.asarray(rotation, dtype=np.intc) for rotation in rotations], dtype=np.intc)
    found = spglib.get_pointgroup(matrices)
    if found is None:
        raise ValueError(f"{len(matrices)} rotations do not form a point group spglib knows")
    number = int(found[1])
    return next(name for last, name in _LAST_POINT_GROUP if number <= last)


__all__ = [
    "CRYSTAL_SYSTEMS",
    "POINT_GROUP_ORDERS",
    "reachable_systems",
    "rotations_crystal_system",
    "smallest_supergroup_order",
]
