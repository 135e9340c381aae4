"""The primitive quotient graph of a net whose cell holds several translation-equivalent copies of it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crystal_tokenizers.slices.automorphisms import PLACEMENT_MATCH, placement_actions
from crystal_tokenizers.slices.graph import CrystalGraph, orient_edge, periodic_rank
from crystal_tokenizers.slices.placement import barycentric_placement, has_collision
from crystal_tokenizers.slices.rotations import reduced_basis


@dataclass(frozen=True)
class PrimitiveNet:
    """The primitive quotient graph of a net whose cell holds several translation-equivalent copies of it.

    ``basis``: columns, the primitive lattice vectors in the cell's fractions; node ``i`` of the cell's
    graph is node ``representative[i]`` of ``graph`` moved by ``translation[i]`` (cell fractions).
    """

    graph: CrystalGraph
    basis: np.ndarray
    representative: tuple[int, ...]
    translation: np.ndarray

    def expand(self, lattice: np.ndarray, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell lattice (rows, Å) and fractional positions of every cell node from a primitive embedding."""
        cell_lattice = np.linalg.solve(self.basis.T, lattice)
        return cell_lattice, frac[list(self.representative)] @ self.basis.T + self.translation


def primitive_net(graph: CrystalGraph, metric: np.ndarray | None = None) -> PrimitiveNet | None:
    """The net's primitive quotient graph when the cell is a supercell of the net (centred cells, e.g. a
    hexagonal crystal in an orthohexagonal C cell), else None.

    The net's translations are read off its barycentric placement (none when it puts two nodes on one
    point); the primitive basis is LLL-reduced under ``metric`` (the cell's, Å²; identity if None), so
    that the net's rotations are letter rotations in it (a hexagonal 6-fold has half-integer entries in
    the orthohexagonal cell's basis).
    """
    placement = barycentric_placement(graph)
    if has_collision(placement) or periodic_rank(graph) < 3:
        return None
    actions = placement_actions(graph, np.eye(3), placement)
    if len(actions) < 2:
        return None
    translations = [placement[sigma[0]] + shifts[0] - placement[0] for sigma, shifts in actions]
    basis = _primitive_basis(translations)
    if basis is None:
        return None
    basis = reduced_basis(basis, np.eye(3) if metric is None else metric)
    orbit_root = [min(sigma[i] for sigma, _ in actions) for i in range(graph.num_nodes)]
    roots = sorted(set(orbit_root))
    representative = tuple(roots.index(root) for root in orbit_root)
    translation = placement - placement[orbit_root]
    inverse = np.linalg.inv(basis)
    primitive = placement[roots] @ inverse.T
    edges = set()
    for i, j, *v in graph.edges:
        offset = (placement[j] + np.array(v) - placement[i]) @ inverse.T - (
            primitive[representative[j]] - primitive[representative[i]]
        )
        if np.abs(offset - np.round(offset)).max() > PLACEMENT_MATCH:
            return None
        edges.add(orient_edge((representative[i], representative[j], *map(int, np.round(offset)))))
    if len(edges) * len(actions) != len(graph.edges):
        return None
    species = tuple(graph.species[root] for root in roots)
    return PrimitiveNet(CrystalGraph(species, tuple(sorted(edges))), basis, representative, translation)


def _primitive_basis(translations: Sequence[np.ndarray]) -> np.ndarray | None:
    """Columns: a basis of the lattice spanned by the cell's lattice vectors and ``translations`` (cell
    fractions), or None when none is found among those vectors."""
    wrapped = [t - np.floor(t + 1e-9) for t in translations]
    candidates = [*np.eye(3), *(t for t in wrapped if np.linalg.norm(t) > 1e-9)]
    for triple in itertools.combinations(candidates, 3):
        if abs(abs(np.linalg.det(np.array(triple))) - 1.0 / len(translations)) < 1e-6:
            return np.array(triple).T
    return None

