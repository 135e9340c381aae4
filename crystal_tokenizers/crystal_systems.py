"""Crystal systems: the package-wide numbering, from a space-group number and from a structure (spglib)."""

from __future__ import annotations

import warnings
from typing import Any

import spglib

CRYSTAL_SYSTEMS: tuple[str, ...] = (
    "cubic", "hexagonal", "trigonal", "tetragonal", "orthorhombic", "monoclinic", "triclinic",
)
"""Crystal systems in the package-wide numbering (0 cubic … 6 triclinic, as the SLICES-PLUS data)."""


def crystal_system(space_group: int) -> str:
    """The crystal system of an ITA space-group number (1–230)."""
    if not 1 <= space_group <= 230:
        raise ValueError(f"space group {space_group} is not in 1..230")
    for upper, name in ((2, "triclinic"), (15, "monoclinic"), (74, "orthorhombic"), (142, "tetragonal"),
                        (167, "trigonal"), (194, "hexagonal"), (230, "cubic")):
        if space_group <= upper:
            return name
    raise AssertionError("unreachable")


JUDGE_SYMPREC_A = 0.1
"""spglib tolerance (Å) for judging the crystal system of a crystal (house convention)."""


def structure_crystal_system(structure: Any, symprec: float = JUDGE_SYMPREC_A) -> str | None:
    """Crystal system of a pymatgen ``Structure`` found by spglib at ``symprec`` Å; None where spglib fails."""
    cell = (structure.lattice.matrix, structure.frac_coords, [site.specie.Z for site in structure])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    except (TypeError, ValueError, AttributeError):
        return None
    return None if dataset is None else crystal_system(int(dataset.number))


__all__ = ["CRYSTAL_SYSTEMS", "JUDGE_SYMPREC_A", "crystal_system", "structure_crystal_system"]
