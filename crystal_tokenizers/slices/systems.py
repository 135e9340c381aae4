"""The crystal system of a finite group of integer rotations, in any basis (no standard setting needed).

Every rotation ``R`` (fractional basis) has a proper part ``P = det(R) R`` whose order follows from its
trace (3: identity, -1: two-fold, 0: three-fold, 1: four-fold, 2: six-fold). A point group is cubic if it
has eight three-fold proper parts (four axes), else hexagonal with a six-fold one, trigonal with a
three-fold one, tetragonal with a four-fold one, orthorhombic with three distinct two-fold ones,
monoclinic with one, triclinic otherwise (International Tables A, Table 10.1.2.2: the crystal system is
fixed by the symmetry directions of the point group).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

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


def rotations_crystal_system(rotations: Iterable[np.ndarray]) -> str:
    """Crystal system of the point group formed by ``rotations`` (3x3 integer matrices, any basis)."""
    proper: dict[int, set[bytes]] = {2: set(), 3: set(), 4: set(), 6: set()}
    order_of_trace = {-1: 2, 0: 3, 1: 4, 2: 6}
    for rotation in rotations:
        matrix = np.asarray(rotation, dtype=int)
        part = int(round(np.linalg.det(matrix))) * matrix
        order = order_of_trace.get(int(np.trace(part)))
        if order is not None:
            proper[order].add(part.tobytes())
    if len(proper[3]) >= 8:
        return "cubic"
    if proper[6]:
        return "hexagonal"
    if proper[3]:
        return "trigonal"
    if proper[4]:
        return "tetragonal"
    if len(proper[2]) >= 3:
        return "orthorhombic"
    return "monoclinic" if proper[2] else "triclinic"


__all__ = [
    "CRYSTAL_SYSTEMS",
    "POINT_GROUP_ORDERS",
    "reachable_systems",
    "rotations_crystal_system",
    "smallest_supergroup_order",
]
