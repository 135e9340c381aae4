"""Geometry of a labelled quotient graph before optimisation: bond targets, barycentric placement, first cell.

Barycentric placement: every node at the mean of its bonded neighbours' images, a linear solve of the
edge equations ``L x = b`` (graph Laplacian ``L``; Delgado-Friedrichs & O'Keeffe, Acta Cryst. A59, 351
(2003)). Bond targets come from the fitted model of ``slices.radii``; the first cell is the metric
tensor that best gives every bond its target length (a 6-unknown linear least-squares problem).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np
from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
from pymatgen.core import Element

from crystal_tokenizers.slices.graph import CrystalGraph, orient_edge, periodic_rank
from crystal_tokenizers.slices.radii import ALPHA, BETA, RADII

_MIN_BOND = 0.5  # Å, floor of a target bond length
_FALLBACK_RADIUS = 1.5  # Å, for elements without a tabulated covalent radius
IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)
"""The 27 neighbouring cells (fractional lattice vectors)."""
ZERO_IMAGE = 13
"""Index of (0, 0, 0) in ``IMAGES``."""
_COLLISION = 1e-3  # fractional distance below which two barycentric nodes coincide
_SMALLEST_ANGLE_DEG = {2: 120.0, 3: 120.0, 4: 109.47, 5: 90.0, 6: 90.0, 7: 72.0, 8: 70.53, 9: 66.0, 10: 64.0}
"""Smallest bond angle of the ideal coordination polyhedron by coordination number (60° beyond)."""


@functools.cache
def covalent_radius(symbol: str) -> float:
    """Covalent radius (Cordero et al. 2008, via pymatgen) in Å."""
    return float(CovalentRadius.radius.get(symbol, _FALLBACK_RADIUS))


@functools.cache
def electronegativity(symbol: str) -> float:
    """Pauling electronegativity, 0 where pymatgen has none (noble gases)."""
    with warnings.catch_warnings():  # pymatgen warns for noble gases
        warnings.simplefilter("ignore")
        chi = Element(symbol).X
    return float(chi) if np.isfinite(chi) else 0.0


@functools.cache
def bond_radius(symbol: str) -> float:
    """Radius (Å) of the fitted bond-length model (``slices.radii``), the covalent radius if unfitted."""
    return RADII.get(symbol, covalent_radius(symbol))


def bond_targets(graph: CrystalGraph) -> np.ndarray:
    """Target length (Å) of every edge of ``graph`` from the fitted model of ``slices.radii``.

    ``d_ij = rho_i + rho_j + ALPHA |chi_i - chi_j| + BETA (ln CN_i + ln CN_j)`` with the coordination
    numbers CN read from the graph (a loop counts twice, as in the fit).
    """
    pairs, _ = edge_arrays(graph)
    degree = np.bincount(pairs.ravel(), minlength=graph.num_nodes).astype(float)
    rho = np.array([bond_radius(s) for s in graph.species])
    chi = np.array([electronegativity(s) for s in graph.species])
    i, j = pairs[:, 0], pairs[:, 1]
    lengths = rho[i] + rho[j] + ALPHA * np.abs(chi[i] - chi[j]) + BETA * (np.log(degree[i]) + np.log(degree[j]))
    return np.maximum(lengths, _MIN_BOND)


def neighbour_pairs(
    graph: CrystalGraph, targets: np.ndarray, slack: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of neighbours of a common atom: node pairs, offsets and minimum distances (Å).

    Two neighbours ``(n1, o1)`` and ``(n2, o2)`` of one atom are the pair ``n1 -> n2`` with offset
    ``o2 - o1``; their minimum distance follows from the two bond targets and the smallest angle of the
    ideal polyhedron of the atom's coordination number (times ``slack``), by the law of cosines.
    """
    ends: list[list[tuple[int, tuple[int, int, int], float]]] = [[] for _ in range(graph.num_nodes)]
    for (i, j, a, b, c), length in zip(graph.edges, targets):
        ends[i].append((j, (a, b, c), length))
        ends[j].append((i, (-a, -b, -c), length))
    bonds = set(graph.edges)
    pairs, offsets, minima = [], [], []
    for centre, neighbours in enumerate(ends):
        angle = np.deg2rad(slack * _SMALLEST_ANGLE_DEG.get(len(neighbours), 60.0))
        for k, (n1, o1, r1) in enumerate(neighbours):
            for n2, o2, r2 in neighbours[k + 1 :]:
                offset = tuple(np.subtract(o2, o1).tolist())
                if orient_edge((n1, n2, *offset)) in bonds or (n1 == n2 and offset == (0, 0, 0)):
                    continue
                pairs.append((n1, n2))
                offsets.append(offset)
                minima.append(np.sqrt(r1**2 + r2**2 - 2 * r1 * r2 * np.cos(angle)))
    return (
        np.array(pairs, dtype=int).reshape(-1, 2),
        np.array(offsets, dtype=float).reshape(-1, 3),
        np.array(minima, dtype=float),
    )


def edge_arrays(graph: CrystalGraph) -> tuple[np.ndarray, np.ndarray]:
    edges = np.array(graph.edges, dtype=int).reshape(-1, 5)
    return edges[:, :2], edges[:, 2:].astype(float)


def barycentric_placement(graph: CrystalGraph, weights: np.ndarray | None = None) -> np.ndarray:
    """Fractional positions (n, 3) solving the (weighted) barycentric edge equations ``L x = b``."""
    n = graph.num_nodes
    pairs, offsets = edge_arrays(graph)
    w = np.ones(len(pairs)) if weights is None else weights
    keep = pairs[:, 0] != pairs[:, 1]  # loops cancel out of the equations
    i, j, v, w = pairs[keep, 0], pairs[keep, 1], offsets[keep], w[keep]
    laplacian = np.zeros((n, n))
    np.add.at(laplacian, (i, i), w)
    np.add.at(laplacian, (j, j), w)
    np.add.at(laplacian, (i, j), -w)
    np.add.at(laplacian, (j, i), -w)
    rhs = np.zeros((n, 3))
    np.add.at(rhs, i, w[:, None] * v)
    np.add.at(rhs, j, -w[:, None] * v)
    return np.linalg.lstsq(laplacian, rhs, rcond=None)[0]


def has_collision(frac: np.ndarray) -> bool:
    """Whether two nodes sit on the same point modulo the lattice."""
    diff = frac[:, None, :] - frac[None, :, :]
    diff -= np.round(diff)
    dist = np.linalg.norm(diff, axis=-1) + np.eye(len(frac))
    return bool(np.any(dist < _COLLISION))


def min_separation(frac: np.ndarray, lat: np.ndarray) -> float:
    """Shortest distance (Å) between two atoms of the crystal (periodic images included)."""
    diff = frac[None, :, :] - frac[:, None, :]
    diff -= np.round(diff)
    vectors = (diff[:, :, None, :] + IMAGES[None, None, :, :]) @ lat
    dist = np.linalg.norm(vectors, axis=-1)
    dist[np.arange(len(frac)), np.arange(len(frac)), ZERO_IMAGE] = np.inf
    return float(dist.min())



def initial_positions(graph: CrystalGraph, rng: np.random.Generator) -> np.ndarray:
    """Barycentric placement, repaired when it collapses atoms or the net is not 3-periodic."""
    frac = barycentric_placement(graph)
    if not has_collision(frac) and periodic_rank(graph) == 3:
        return frac
    for _ in range(3):
        frac = barycentric_placement(graph, rng.uniform(0.5, 1.5, len(graph.edges)))
        if not has_collision(frac):
            break
    return frac + rng.normal(0.0, 0.05, frac.shape)


def initial_metric(graph: CrystalGraph, frac: np.ndarray, targets: np.ndarray, volume: float) -> np.ndarray:
    """Metric tensor (Å², 3x3) fitting ``d_e^T G d_e = r_e^2``, regularised toward a cubic cell."""
    pairs, offsets = edge_arrays(graph)
    d = frac[pairs[:, 1]] - frac[pairs[:, 0]] + offsets
    design = np.column_stack(
        [d[:, 0] ** 2, d[:, 1] ** 2, d[:, 2] ** 2, 2 * d[:, 0] * d[:, 1], 2 * d[:, 0] * d[:, 2], 2 * d[:, 1] * d[:, 2]]
    )
    side2 = volume ** (2 / 3)
    prior = np.array([side2, side2, side2, 0.0, 0.0, 0.0])
    lam = 1e-6 * max(1.0, float(np.mean(targets**2)))
    lhs = np.vstack([design, lam * np.eye(6) / side2])
    rhs = np.concatenate([targets**2, lam * prior / side2])
    g = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    metric = np.array([[g[0], g[3], g[4]], [g[3], g[1], g[5]], [g[4], g[5], g[2]]])
    evals, evecs = np.linalg.eigh(metric)
    evals = np.maximum(evals, 0.1 * side2)
    return (evecs * evals) @ evecs.T

