"""Labelled quotient graph (+ symmetry operations) -> coordinates and cell, without an ML potential.

Pipeline (each step a small function):

1. Symmetry (SLICES-PLUS): each decoded rotation must act on the labelled graph as an automorphism
   (read off the barycentric placement, else a budgeted backtracking search; products of found
   operations are composed). Inconsistent operations raise ``SymmetryMismatchError`` when
   ``strict_symmetry``, else they are logged and left out. Plain SLICES: the net's own point group is
   used instead, the rotations (among those SLICES-PLUS letters can write, in the cell's basis or its
   reduced basis) that act on the graph (``net_symmetry``; a budgeted backtracking search where the
   barycentric placement collides); failing that, the symmetry spglib finds in the placed crystal.
   A plain-SLICES cell holding several translation-equivalent copies of the net (a centred or
   supercell setting) is decoded as its primitive net and expanded back (``primitive_net``), so
   rotations the cell's basis cannot write (the 6-fold axis of an orthohexagonal cell) are imposed.
2. Barycentric placement: every node at the mean of its bonded neighbours' images, a linear solve of
   the edge equations ``L x = b`` (graph Laplacian ``L``; Delgado-Friedrichs & O'Keeffe, Acta Cryst.
   A59, 351 (2003)). Placements that put two atoms on one point, or nets that are not 3-periodic,
   are repaired by a randomly weighted (non-barycentric) placement plus a small seeded perturbation.
3. Initial cell: the metric tensor that best gives every bond its target length (a 6-unknown linear
   least-squares problem), projected onto the operations (group average of ``R^T G R``).
4. Optimisation (scipy L-BFGS-B, analytic gradients, vectorised numpy; gradients projected onto the
   symmetric subspace) of the lower-triangular cell and the fractional positions: harmonic bond
   lengths toward the fitted model of ``slices.radii``; a one-sided term keeping two neighbours of an
   atom at least the smallest angle of the ideal polyhedron apart; a one-sided repulsion between
   non-bonded atoms; a weak pressure. One refinement then keeps every bond within ``band_factor``
   and every non-bonded pair beyond ``gap_factor`` of the two atoms' shortest bonds (the
   MinimumDistanceNN rule).
5. Positions and metric are projected onto the operations (Reynolds average), so the crystal has the
   decoded point group; ``embed_checked`` re-runs with other parameters while the decoded crystal's
   graph differs from the string's.

Every decode is time-boxed (``DecodeTimeoutError``), so fuzzed graphs end in an error, not a hang.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
from pymatgen.core import Element, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
from scipy.optimize import minimize

from crystal_tokenizers.errors import (
    CrystalDecodeError,
    CrystalEncodeError,
    DecodeTimeoutError,
    EmbeddingError,
    SymmetryMismatchError,
)
from crystal_tokenizers.slices.codec import SymOp
from crystal_tokenizers.slices.graph import (
    CrystalGraph,
    graphs_match,
    orient_edge,
    periodic_rank,
    shift_gauge,
    structure_to_graph,
)
from crystal_tokenizers.slices.radii import ALPHA, BETA, RADII
from crystal_tokenizers.slices.rotations import MAX_POINT_GROUP_ORDER, rotation_algebra

logger = logging.getLogger(__name__)

_MIN_BOND = 0.5  # Å, floor of a target bond length
_FALLBACK_RADIUS = 1.5  # Å, for elements without a tabulated covalent radius
_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)  # 27 neighbouring cells
_ZERO_IMAGE = 13  # index of (0, 0, 0) in _IMAGES
_COLLISION = 1e-3  # fractional distance below which two barycentric nodes coincide
_MIN_SEPARATION = 0.5  # Å, closest approach of two decoded atoms (the structural-validity bound)
_MIN_VOLUME_PER_ATOM = 4.0  # Å^3; diamond has 5.7, the densest MP-20 sample crystal (Be3N2) 6.9
_SEPARATION_STEPS = (0.02, 0.05, 0.1)  # fractional scales of the symmetric kicks that part coincident atoms
_SMALLEST_ANGLE_DEG = {2: 120.0, 3: 120.0, 4: 109.47, 5: 90.0, 6: 90.0, 7: 72.0, 8: 70.53, 9: 66.0, 10: 64.0}
"""Smallest bond angle of the ideal coordination polyhedron by coordination number (60° beyond)."""
_NET_SYMPRECS = (0.01,)  # Å, tolerance for the exact symmetry of a barycentric placement
_DETECT_SYMPRECS = (0.3, 0.1, 0.03)  # Å, tolerances tried when reading the symmetry of a plain-SLICES decode
_PLACEMENT_MATCH = 1e-6  # fractional distance within which a mapped barycentric node lies on a node
_MAX_AUTOMORPHISM_STEPS = 500
_SYMMETRY_SEARCH_S = 1.0  # time budget of the backtracking automorphism searches per decode


Action = tuple[list[int], np.ndarray]
"""How an operation acts on the nodes: it maps node ``i`` onto node ``sigma[i]`` in the cell ``shifts[i]``."""


@dataclass(frozen=True)
class EmbeddingParams:
    """Weights and limits of the embedding (lengths in Å, time in s)."""

    repulsion_factor: float = 1.25
    """Non-bonded atoms are pushed apart to this multiple of the longer of their shortest bonds."""
    repulsion_weight: float = 1.0
    pressure_weight: float = 0.02
    """Weight of the volume term (volume relative to the sum of covalent-sphere volumes)."""
    angle_weight: float = 1.0
    """Weight of the one-sided term keeping two neighbours of an atom at least the polyhedron's angle apart."""
    angle_slack: float = 1.0
    """Fraction of the ideal polyhedron's smallest bond angle that neighbour pairs must keep."""
    detect_symmetry: bool = True
    """Without decoded operations, impose the graph-consistent symmetry found in the optimised crystal."""
    refinements: int = 1
    """Re-optimisations with the bond band and gaps of ``_Objective.tighten`` (0 disables them)."""
    band_factor: float = 1.04
    gap_factor: float = 1.2
    band_weight: float = 4.0
    max_iterations: int = 400
    time_limit_s: float = 10.0
    seed: int = 0
    strict_symmetry: bool = False
    """Raise ``SymmetryMismatchError`` (instead of leaving operations out) for inconsistent operations."""


class _Timeout(Exception):
    """Raised inside the objective when the time box is exceeded."""


class _SearchExhausted(Exception):
    """Raised when the automorphism search used up its step budget."""


def covalent_radius(symbol: str) -> float:
    """Covalent radius (Cordero et al. 2008, via pymatgen) in Å."""
    return float(CovalentRadius.radius.get(symbol, _FALLBACK_RADIUS))


def electronegativity(symbol: str) -> float:
    """Pauling electronegativity, 0 where pymatgen has none (noble gases)."""
    with warnings.catch_warnings():  # pymatgen warns for noble gases
        warnings.simplefilter("ignore")
        chi = Element(symbol).X
    return float(chi) if np.isfinite(chi) else 0.0


def bond_radius(symbol: str) -> float:
    """Radius (Å) of the fitted bond-length model (``slices.radii``), the covalent radius if unfitted."""
    return RADII.get(symbol, covalent_radius(symbol))


def bond_targets(graph: CrystalGraph) -> np.ndarray:
    """Target length (Å) of every edge of ``graph`` from the fitted model of ``slices.radii``.

    ``d_ij = rho_i + rho_j + ALPHA |chi_i - chi_j| + BETA (ln CN_i + ln CN_j)`` with the coordination
    numbers CN read from the graph (a loop counts twice, as in the fit).
    """
    pairs, _ = _edge_arrays(graph)
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


def _edge_arrays(graph: CrystalGraph) -> tuple[np.ndarray, np.ndarray]:
    edges = np.array(graph.edges, dtype=int).reshape(-1, 5)
    return edges[:, :2], edges[:, 2:].astype(float)


def barycentric_placement(graph: CrystalGraph, weights: np.ndarray | None = None) -> np.ndarray:
    """Fractional positions (n, 3) solving the (weighted) barycentric edge equations ``L x = b``."""
    n = graph.num_nodes
    pairs, offsets = _edge_arrays(graph)
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
    vectors = (diff[:, :, None, :] + _IMAGES[None, None, :, :]) @ lat
    dist = np.linalg.norm(vectors, axis=-1)
    dist[np.arange(len(frac)), np.arange(len(frac)), _ZERO_IMAGE] = np.inf
    return float(dist.min())


def separate_symmetric(
    frac: np.ndarray, metric: np.ndarray, rotations: np.ndarray, actions: Sequence[Action], rng: np.random.Generator
) -> np.ndarray:
    """Part atoms that a symmetrised placement put on one point by a random kick projected onto the operations.

    A pendant atom sits at its only neighbour's barycentre, and the bond term has no direction at zero
    length, so without a kick the optimisation keeps such pairs together. The projected kick keeps the
    symmetry (an atom on a special position only moves along its site's free directions).
    """
    for scale in _SEPARATION_STEPS:
        if not has_collision(frac):
            break
        frac, _ = symmetrize(frac + rng.normal(0.0, scale, frac.shape), metric, rotations, actions)
    return frac


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
    pairs, offsets = _edge_arrays(graph)
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


class _Objective:
    """Energy and analytic gradient of cell (6 lower-triangular entries) + fractional positions."""

    def __init__(self, graph: CrystalGraph, params: EmbeddingParams, deadline: float) -> None:
        n = graph.num_nodes
        self.n, self.params, self.deadline = n, params, deadline
        self.pairs, self.offsets = _edge_arrays(graph)
        self.targets = bond_targets(graph)
        iu, ju = np.triu_indices(n)
        self.pi, self.pj = iu, ju
        self.pair_index = np.full((n, n), -1)
        self.pair_index[iu, ju] = np.arange(len(iu))
        shortest = np.full(n, np.inf)
        np.minimum.at(shortest, self.pairs[:, 0], self.targets)
        np.minimum.at(shortest, self.pairs[:, 1], self.targets)
        self.rmin_static = params.repulsion_factor * np.maximum(shortest[iu], shortest[ju])
        self.rmin = self.rmin_static.copy()
        self.band = np.full(len(self.pairs), np.inf)  # upper bound of each bond length (Å)
        self.exclude = np.zeros((len(iu), len(_IMAGES)), dtype=bool)
        self.exclude[iu == ju, _ZERO_IMAGE] = True
        radii = np.array([bond_radius(s) for s in graph.species])
        self.volume0 = float(np.sum(4.0 / 3.0 * np.pi * radii**3))
        self.loops = self.pairs[:, 0] == self.pairs[:, 1]
        self.symmetry: tuple[np.ndarray, np.ndarray] | None = None  # (rotations K x 3 x 3, permutations K x n)
        self.angle_pairs, self.angle_offsets, self.angle_minima = neighbour_pairs(graph, self.targets, params.angle_slack)

    def tighten(self, x: np.ndarray) -> None:
        """Set the bond band and repulsion radii from the current shortest bond of every atom.

        Mirrors the MinimumDistanceNN rule: atoms i, j are bonded iff their distance is at most
        (1 + tol) max(m_i, m_j), ``m`` being each atom's shortest distance. Bonds are kept below
        ``band_factor`` M and non-bonded pairs pushed beyond ``gap_factor`` M.
        """
        lat = self.lattice(x)
        frac = x[6:].reshape(self.n, 3)
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        length = np.linalg.norm((frac[j] - frac[i] + self.offsets) @ lat, axis=1)
        shortest = np.full(self.n, np.inf)
        np.minimum.at(shortest, i, length)
        np.minimum.at(shortest, j, length)
        self.band = self.params.band_factor * np.maximum(shortest[i], shortest[j])
        self.rmin = np.maximum(self.rmin_static, self.params.gap_factor * np.maximum(shortest[self.pi], shortest[self.pj]))

    @staticmethod
    def lattice(x: np.ndarray) -> np.ndarray:
        """Lower-triangular lattice matrix (rows = lattice vectors, Å) from the first 6 entries."""
        a = np.zeros((3, 3))
        a[np.tril_indices(3)] = x[:6]
        return a

    def _bonded_images(self, frac: np.ndarray) -> np.ndarray:
        """Mask of (pair, image) slots that are bonds, given the nearest-image convention."""
        mask = self.exclude.copy()
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        k = self.offsets + np.round(frac[j] - frac[i])
        ok = np.all(np.abs(k) <= 1, axis=1)
        image = ((k[:, 0] + 1) * 9 + (k[:, 1] + 1) * 3 + (k[:, 2] + 1)).astype(int)
        mask[self.pair_index[i[ok], j[ok]], image[ok]] = True
        loops = ok & self.loops
        mask[self.pair_index[i[loops], j[loops]], 26 - image[loops]] = True
        return mask

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if time.monotonic() > self.deadline:
            raise _Timeout
        lat = self.lattice(x)
        frac = x[6:].reshape(self.n, 3)
        grad_frac = np.zeros_like(frac)
        grad_lat = np.zeros((3, 3))
        # bonds
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        delta = frac[j] - frac[i] + self.offsets
        cart = delta @ lat
        length = np.linalg.norm(cart, axis=1) + 1e-12
        resid = (length - self.targets) / self.targets
        excess = np.maximum(length - self.band, 0.0) / self.targets
        energy = float(np.sum(resid**2) + self.params.band_weight * np.sum(excess**2))
        g_cart = ((2 * resid + 2 * self.params.band_weight * excess) / self.targets / length)[:, None] * cart
        # neighbours of one atom kept apart (bond angles)
        ai, aj = self.angle_pairs[:, 0], self.angle_pairs[:, 1]
        adelta = frac[aj] - frac[ai] + self.angle_offsets
        acart = adelta @ lat
        alen = np.linalg.norm(acart, axis=1) + 1e-12
        ashort = np.maximum(self.angle_minima - alen, 0.0) / self.angle_minima
        wa = self.params.angle_weight
        energy += wa * float(np.sum(ashort**2))
        g_acart = (-2 * wa * ashort / self.angle_minima / alen)[:, None] * acart
        grad_lat += adelta.T @ g_acart
        g_adelta = g_acart @ lat.T
        np.add.at(grad_frac, aj, g_adelta)
        np.add.at(grad_frac, ai, -g_adelta)
        # repulsion between non-bonded image pairs
        base = frac[self.pj] - frac[self.pi]
        base -= np.round(base)
        rdelta = base[:, None, :] + _IMAGES[None, :, :]
        rcart = rdelta @ lat
        rlen = np.linalg.norm(rcart, axis=-1) + 1e-12
        rmin = self.rmin[:, None]
        active = (rlen < rmin) & ~self._bonded_images(frac)
        over = np.where(active, (rmin - rlen) / rmin, 0.0)
        w = self.params.repulsion_weight
        energy += w * float(np.sum(over**2))
        g_rcart = (-2 * w * over / rmin / rlen)[..., None] * rcart
        # pressure
        volume = abs(float(np.linalg.det(lat)))
        pw = self.params.pressure_weight / self.volume0
        energy += pw * volume
        grad_lat += pw * volume * np.linalg.inv(lat).T
        # back-propagate Cartesian gradients to positions and cell
        grad_lat += delta.T @ g_cart
        g_delta = g_cart @ lat.T
        np.add.at(grad_frac, j, g_delta)
        np.add.at(grad_frac, i, -g_delta)
        rdelta_flat, g_rcart_flat = rdelta.reshape(-1, 3), g_rcart.reshape(-1, 3)
        grad_lat += rdelta_flat.T @ g_rcart_flat
        g_rdelta = (g_rcart @ lat.T).sum(axis=1)
        np.add.at(grad_frac, self.pj, g_rdelta)
        np.add.at(grad_frac, self.pi, -g_rdelta)
        if self.symmetry is not None:  # stay in the symmetric subspace: g_i <- mean_k R_k^T g_sigma_k(i)
            rotations, sigmas = self.symmetry
            grad_frac = np.mean(np.einsum("kni,kij->knj", grad_frac[sigmas], rotations), axis=0)
        grad = np.concatenate([grad_lat[np.tril_indices(3)], grad_frac.ravel()])
        return energy, grad


def _maps_edges(graph: CrystalGraph, rotation: np.ndarray, sigma: Sequence[int], shifts: np.ndarray) -> bool:
    """Whether ``(sigma, shifts)`` maps every edge ``(i, j, v)`` to the edge ``(sigma i, sigma j, R v + s_j - s_i)``."""
    edges = np.array(graph.edges, dtype=int)
    sig = np.asarray(sigma)
    mapped = edges[:, 2:] @ rotation.T + shifts[edges[:, 1]] - shifts[edges[:, 0]]
    images = {orient_edge((int(a), int(b), *map(int, v))) for a, b, v in zip(sig[edges[:, 0]], sig[edges[:, 1]], mapped)}
    return images == set(graph.edges)


def _automorphism_from_placement(graph: CrystalGraph, rotation: np.ndarray, placement: np.ndarray) -> Action | None:
    """One action of an automorphism with linear part ``rotation`` read off the placement, or None."""
    actions = placement_actions(graph, rotation, placement, limit=1)
    return actions[0] if actions else None


def _automorphism(graph: CrystalGraph, rotation: np.ndarray, deadline: float) -> Action | None:
    """Node permutation and integer shifts realising ``rotation`` on the labelled graph, or None.

    Finds ``sigma, s`` with every edge ``(i, j, v)`` mapped to the edge ``(sigma i, sigma j, R v +
    s_j - s_i)`` (backtracking over the image of each node, propagated along edges).
    """
    n = graph.num_nodes
    edge_set = set(graph.edges)
    incident: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for i, j, *v in graph.edges:
        incident[i].append((j, np.array(v)))
        incident[j].append((i, -np.array(v)))
    out_edges: list[dict[int, list[np.ndarray]]] = [{} for _ in range(n)]
    for i, j, *v in graph.edges:
        out_edges[i].setdefault(j, []).append(np.array(v))
        out_edges[j].setdefault(i, []).append(-np.array(v))
    order = _bfs_order(incident, n)
    steps = 0

    def consistent(sigma: dict[int, int], shift: dict[int, np.ndarray], node: int) -> bool:
        for other, v in incident[node]:
            if other in sigma:
                w = rotation @ v + shift[other] - shift[node]
                if orient_edge((sigma[node], sigma[other], *map(int, w))) not in edge_set:
                    return False
        return True

    def extend(k: int, sigma: dict[int, int], shift: dict[int, np.ndarray], used: set[int]) -> bool:
        nonlocal steps
        steps += 1
        if steps > _MAX_AUTOMORPHISM_STEPS or time.monotonic() > deadline:
            raise _SearchExhausted
        if k == n:
            return True
        node, parent, v = order[k]
        if parent is None:
            candidates = [(m, np.zeros(3, dtype=int)) for m in range(n)]
        else:
            target = sigma[parent]
            candidates = [
                (m, w - rotation @ v + shift[parent])
                for m, ws in out_edges[target].items()
                for w in ws
            ]
        for m, s in candidates:
            if m in used or graph.species[m] != graph.species[node]:
                continue
            sigma[node], shift[node] = m, s.astype(int)
            if consistent(sigma, shift, node):
                used.add(m)
                if extend(k + 1, sigma, shift, used):
                    return True
                used.discard(m)
            del sigma[node], shift[node]
        return False

    sigma: dict[int, int] = {}
    shift: dict[int, np.ndarray] = {}
    try:
        if not extend(0, sigma, shift, set()):
            return None
    except _SearchExhausted:
        logger.debug("automorphism search gave up after %d steps", _MAX_AUTOMORPHISM_STEPS)
        return None
    return [sigma[k] for k in range(n)], np.array([shift[k] for k in range(n)])


def _maps_bond_vectors(graph: CrystalGraph, rotations: np.ndarray, placement: np.ndarray) -> np.ndarray:
    """Which ``rotations`` (n, 3, 3) may map the placed bond vectors, with their end species, onto placed ones.

    Necessary for an automorphism (the barycentric placement of a connected 3-periodic net is
    equivariant, also where it puts several nodes on one point); a vectorised filter before the exact
    tests. Vectors are compared by their projection on a fixed generic direction, offset by the
    species pair, so the filter may pass a rotation that fails but never stops one that works.
    """
    edges = np.array(graph.edges, dtype=int)
    species = np.unique(np.array(graph.species), return_inverse=True)[1]
    vectors = placement[edges[:, 1]] + edges[:, 2:] - placement[edges[:, 0]]
    direction = np.array([1.0, np.sqrt(2.0), np.pi]) / np.sqrt(3.0 + np.pi**2)
    pair = species[edges[:, 0]] * (species.max() + 1) + species[edges[:, 1]]
    reverse = species[edges[:, 1]] * (species.max() + 1) + species[edges[:, 0]]
    spread = 4.0 * (np.abs(vectors).sum() + 1.0)  # beyond any projection of a bond vector
    targets = np.sort(np.concatenate([vectors @ direction + pair * spread, -vectors @ direction + reverse * spread]))
    moved = np.einsum("rij,ej,i->re", rotations, vectors, direction) + pair * spread
    index = np.clip(np.searchsorted(targets, moved), 1, len(targets) - 1)
    nearest = np.minimum(np.abs(targets[index] - moved), np.abs(targets[index - 1] - moved))
    return np.all(nearest < 1e-6 * spread, axis=1)


def graph_automorphisms(
    graph: CrystalGraph,
    rotations: np.ndarray,
    time_limit_s: float = _SYMMETRY_SEARCH_S,
    placement: np.ndarray | None = None,
) -> dict[int, Action]:
    """Node permutation and shifts of an automorphism for each of ``rotations`` (n, 3, 3) that has one.

    For a connected 3-periodic graph. Exact from the barycentric placement when it puts no two nodes
    on one point (it is then equivariant). Otherwise the candidates are searched by backtracking until
    ``time_limit_s`` runs out; those left unsearched count as having no automorphism. ``placement``:
    the graph's barycentric placement, when the caller has it already.
    """
    placement = barycentric_placement(graph) if placement is None else placement
    candidates = np.flatnonzero(_maps_bond_vectors(graph, rotations, placement))
    found = {}
    for k in candidates:
        action = _automorphism_from_placement(graph, rotations[k], placement)
        if action is not None:
            found[int(k)] = action
    if has_collision(placement):
        deadline = time.monotonic() + time_limit_s
        for k in candidates:
            if time.monotonic() > deadline:
                break
            if int(k) not in found:
                action = _automorphism(graph, rotations[k], deadline)
                if action is not None:
                    found[int(k)] = action
    return found


def graph_automorphism_rotations(
    graph: CrystalGraph, rotations: np.ndarray, time_limit_s: float = _SYMMETRY_SEARCH_S
) -> np.ndarray:
    """Which of ``rotations`` (n, 3, 3) are linear parts of automorphisms of the graph (bool, n; see
    ``graph_automorphisms``)."""
    mask = np.zeros(len(rotations), dtype=bool)
    mask[list(graph_automorphisms(graph, rotations, time_limit_s))] = True
    return mask


def net_symmetry(
    graph: CrystalGraph, metric: np.ndarray | None = None, time_limit_s: float = _SYMMETRY_SEARCH_S
) -> tuple[np.ndarray, list[Action]]:
    """The point group of the net's automorphisms: rotations (K, 3, 3, integer, on the cell's fractional
    coordinates) with their actions; empty if they do not close into a group.

    Used for plain SLICES, whose strings carry no operations. Rotations are searched among those the
    SLICES-PLUS letters can write, in the cell's basis and in its LLL-reduced basis under ``metric``
    (the cell's metric tensor in Å²; identity if None), whose rotations can have entries beyond ±1 in
    the cell's basis. A placement that puts two nodes on one point is searched by backtracking in
    the cell's basis until ``time_limit_s`` runs out (see ``graph_automorphisms``).
    """
    placement = barycentric_placement(graph)
    algebra = rotation_algebra()
    if has_collision(placement):
        found = graph_automorphisms(graph, algebra.matrices, time_limit_s, placement=placement)
        numbers = frozenset(found)
        if not numbers or algebra.closure(numbers) != numbers:
            return np.empty((0, 3, 3)), []
        ordered = sorted(numbers)
        return algebra.matrices[ordered].astype(float), [found[k] for k in ordered]
    group: dict[bytes, tuple[np.ndarray, Action]] = {}
    for basis in (np.eye(3), _reduced_basis(np.eye(3), np.eye(3) if metric is None else metric)):
        rotations = np.round(basis @ algebra.matrices @ np.linalg.inv(basis))  # unimodular basis: integer
        for k in np.flatnonzero(_maps_bond_vectors(graph, rotations, placement)):
            _add_rotation(group, graph, rotations[k], placement)
    grew = True
    while grew and len(group) <= MAX_POINT_GROUP_ORDER:  # products of automorphisms are automorphisms
        grew = False
        for (r1, _), (r2, _) in itertools.product(list(group.values()), repeat=2):
            grew |= _add_rotation(group, graph, r1 @ r2, placement)
    if not group or len(group) > MAX_POINT_GROUP_ORDER:
        return np.empty((0, 3, 3)), []
    return np.array([rotation for rotation, _ in group.values()]), [action for _, action in group.values()]


def _add_rotation(
    group: dict[bytes, tuple[np.ndarray, Action]], graph: CrystalGraph, rotation: np.ndarray, placement: np.ndarray
) -> bool:
    """Add ``rotation`` (integer) with an action to ``group`` if it is new and acts on the net; whether it was added."""
    key = rotation.astype(int).tobytes()
    if key in group:
        return False
    actions = placement_actions(graph, rotation, placement, limit=1)
    if actions:
        group[key] = (rotation, actions[0])
    return bool(actions)


def _reduced_basis(basis: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """Columns: the LLL-reduced basis (pymatgen) of the lattice whose basis columns ``basis`` are given in
    cell fractions, reduced under the cell's metric tensor ``metric`` (Å²)."""
    mapping = Lattice(basis.T @ np.linalg.cholesky(metric).T).lll_mapping
    return (np.round(mapping) @ basis.T).T


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
    basis = _reduced_basis(basis, np.eye(3) if metric is None else metric)
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
        if np.abs(offset - np.round(offset)).max() > _PLACEMENT_MATCH:
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


def placement_actions(
    graph: CrystalGraph, rotation: np.ndarray, placement: np.ndarray, limit: int | None = None
) -> list[Action]:
    """Every action (at most ``limit``) of an automorphism of the net with linear part ``rotation``
    (integer, cell basis), read off the barycentric ``placement`` (no two nodes on one point); one per
    translation part modulo the cell's lattice (for the identity: the net's own translations).

    The placement is equivariant: an automorphism maps ``R x_i + tau`` onto ``x_sigma(i) + s_i``, so
    each image of node 0 fixes ``tau``; the operation must also map every bond ``(i, j, v)`` onto a
    bond, its far end ``R (x_j + v) + tau`` being located in the placement.
    """
    species = np.array(graph.species)
    edges = np.array(graph.edges, dtype=int).reshape(-1, 5)
    edge_set = set(graph.edges)
    mapped = placement @ rotation.T
    found = []
    for m in np.flatnonzero(species == species[0]):
        moved = mapped + (placement[m] - mapped[0])
        nodes = _locate(moved, species, placement, species)
        if nodes is None or len(set(nodes[0].tolist())) != len(nodes[0]):
            continue
        sigma, shifts = nodes
        ends = _locate(moved[edges[:, 1]] + edges[:, 2:] @ rotation.T, species[edges[:, 1]], placement, species)
        if ends is None:
            continue
        start = sigma[edges[:, 0]]
        cells = ends[1] - shifts[edges[:, 0]]
        images = {orient_edge((int(a), int(b), *map(int, c))) for a, b, c in zip(start, ends[0], cells)}
        if images == edge_set:
            found.append((sigma.tolist(), shifts))
            if len(found) == limit:
                break
    return found


def _locate(
    points: np.ndarray, point_species: np.ndarray, placement: np.ndarray, species: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Node and integer cell of every point, if each lies on a placed node of its species."""
    diff = points[:, None, :] - placement[None, :, :]
    cells = np.round(diff)
    dist = np.linalg.norm(diff - cells, axis=-1)
    dist[point_species[:, None] != species[None, :]] = np.inf
    nodes = np.argmin(dist, axis=1)
    rows = np.arange(len(points))
    if np.max(dist[rows, nodes]) > _PLACEMENT_MATCH:
        return None
    return nodes, cells[rows, nodes].astype(int)


def _bfs_order(incident: list[list[tuple[int, np.ndarray]]], n: int) -> list[tuple[int, int | None, np.ndarray]]:
    """Nodes in breadth-first order with the parent and the offset of the edge parent -> node."""
    seen: set[int] = set()
    order: list[tuple[int, int | None, np.ndarray]] = []
    for root in range(n):
        if root in seen:
            continue
        seen.add(root)
        order.append((root, None, np.zeros(3, dtype=int)))
        queue = [root]
        while queue:
            u = queue.pop(0)
            for w, v in incident[u]:
                if w not in seen:
                    seen.add(w)
                    order.append((w, u, v))
                    queue.append(w)
    return order


def _closed(rotations: Sequence[np.ndarray]) -> bool:
    """Whether a set of integer matrices is closed under multiplication (a point group)."""
    keys = {r.tobytes() for r in rotations}
    return all((a @ b).tobytes() in keys for a in rotations for b in rotations)


def symmetry_actions(
    graph: CrystalGraph, symops: Sequence[SymOp], deadline: float, strict: bool
) -> tuple[tuple[SymOp, ...], list[Action]]:
    """The operations that act on the graph, each with its node permutation and shifts.

    An operation that is not an automorphism of the labelled graph raises ``SymmetryMismatchError``
    when ``strict``; otherwise it is logged and left out, and if the remaining rotations are no longer
    a group the symmetry part is ignored altogether (the net's own symmetry still shapes the result).
    """
    placement = barycentric_placement(graph)
    search_deadline = min(deadline, time.monotonic() + _SYMMETRY_SEARCH_S)
    found: dict[bytes, Action] = {}
    rotations = [op.matrices()[0] for op in symops]
    for rotation in rotations:
        key = rotation.tobytes()
        if key in found:
            continue
        action = _automorphism_from_placement(graph, rotation, placement)
        if action is None and time.monotonic() < search_deadline:
            action = _automorphism(graph, rotation, search_deadline)
        if action is not None:
            found[key] = action
            _close_under_products(found, {r.tobytes() for r in rotations})
    kept: list[SymOp] = []
    actions: list[Action] = []
    for k, (op, rotation) in enumerate(zip(symops, rotations)):
        if rotation.tobytes() not in found:
            message = f"operation {k} ({' '.join(op.tokens())}) is not an automorphism of the crystal graph"
            if strict:
                raise SymmetryMismatchError(message)
            logger.warning("%s; left out", message)
            continue
        kept.append(op)
        actions.append(found[rotation.tobytes()])
    if len(kept) < len(symops) and not _closed([op.matrices()[0] for op in kept]):
        logger.warning("the consistent operations do not form a group; symmetry part ignored")
        return (), []
    return tuple(kept), actions


def _close_under_products(found: dict[bytes, Action], wanted: set[bytes]) -> None:
    """Add to ``found`` every wanted rotation that is a product of found ones, with its composed action.

    ``(R1, sigma1, s1) o (R2, sigma2, s2)`` maps node ``i`` to ``sigma1(sigma2(i))`` with shift
    ``s1[sigma2(i)] + R1 s2[i]``.
    """
    rotations = {key: np.frombuffer(key, dtype=int).reshape(3, 3) for key in found}
    grew = True
    while grew:
        grew = False
        for k1, r1 in list(rotations.items()):
            for k2, r2 in list(rotations.items()):
                product_rotation = r1 @ r2
                key = product_rotation.tobytes()
                if key in found or key not in wanted:
                    continue
                (sigma1, s1), (sigma2, s2) = found[k1], found[k2]
                sigma = [sigma1[sigma2[i]] for i in range(len(sigma2))]
                found[key] = (sigma, s1[np.asarray(sigma2)] + s2 @ r1.T)
                rotations[key] = product_rotation
                grew = True


def _action_from_geometry(
    graph: CrystalGraph, frac: np.ndarray, lat: np.ndarray, rotation: np.ndarray, translation: np.ndarray, tol: float
) -> Action | None:
    """Node permutation and shifts of an operation read off positions (within ``tol`` Å), if it maps the graph."""
    species = np.array(graph.species)
    moved = frac @ rotation.T + translation
    diff = moved[:, None, :] - frac[None, :, :]
    lattice_part = np.round(diff)
    dist = np.linalg.norm((diff - lattice_part) @ lat, axis=-1)
    dist[species[:, None] != species[None, :]] = np.inf
    sigma = np.argmin(dist, axis=1)
    rows = np.arange(len(sigma))
    if np.max(dist[rows, sigma]) > tol or len(set(sigma.tolist())) != len(sigma):
        return None
    shifts = lattice_part[rows, sigma].astype(int)
    return (sigma.tolist(), shifts) if _maps_edges(graph, rotation, sigma, shifts) else None


def detect_symmetry(
    graph: CrystalGraph, frac: np.ndarray, lat: np.ndarray, symprecs: Sequence[float] = _DETECT_SYMPRECS
) -> tuple[np.ndarray, list[Action]]:
    """Operations of a decoded crystal (spglib, loosest tolerance first) that are also graph automorphisms.

    Used for plain SLICES, whose strings carry no operations: the net's own symmetry, blurred by the
    repair of collapsed placements, is found and then imposed exactly.
    """
    structure = Structure(Lattice(lat), list(graph.species), frac)
    for symprec in symprecs:
        try:
            ops = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetry_operations()
        except (TypeError, ValueError):
            continue
        rotations, actions = [], []
        for op in ops:
            rotation = np.round(op.rotation_matrix).astype(int)
            action = _action_from_geometry(graph, frac, lat, rotation, op.translation_vector, 2 * symprec)
            if action is None:
                break
            rotations.append(rotation)
            actions.append(action)
        else:
            return np.array(rotations, dtype=float).reshape(-1, 3, 3), actions
    return np.empty((0, 3, 3)), []


def symmetrize(
    frac: np.ndarray, metric: np.ndarray, rotations: np.ndarray, actions: Sequence[Action]
) -> tuple[np.ndarray, np.ndarray]:
    """Project positions and metric onto the operations (Reynolds average over the group): ``rotations``
    (K, 3, 3) on fractional coordinates and their actions, one per operation modulo the lattice.

    The translation of each operation is re-estimated from the positions, so the result has the
    decoded operations up to a shift of origin.
    """
    metric = sum(r.T @ metric @ r for r in rotations) / len(rotations)
    for _ in range(2):
        images = np.zeros_like(frac)
        for rot, (sigma, shift) in zip(rotations, actions):
            mapped = frac @ rot.T  # R f_i
            target = frac[sigma] + shift  # f_sigma(i) + s_i, up to the operation's translation
            translation = np.mean(target - mapped, axis=0)
            # preimage of f_sigma(i): R^-1 (f_sigma(i) + s_i - t)
            images += (target - translation) @ np.linalg.inv(rot).T
        frac = images / len(rotations)
    return frac, metric


def _minimise(
    objective: _Objective, lat: np.ndarray, frac: np.ndarray, params: EmbeddingParams
) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS-B from a lower-triangular cell and positions, then ``params.refinements`` re-runs."""
    x = np.concatenate([lat[np.tril_indices(3)], frac.ravel()])
    options = {"maxiter": params.max_iterations}
    x = minimize(objective, x, jac=True, method="L-BFGS-B", options=options).x
    for _ in range(params.refinements):
        objective.tighten(x)
        x = minimize(objective, x, jac=True, method="L-BFGS-B", options=options).x
    return _Objective.lattice(x), x[6:].reshape(-1, 3)


def embed(
    graph: CrystalGraph, symops: Sequence[SymOp] = (), params: EmbeddingParams = EmbeddingParams()
) -> Structure:
    """A crystal whose bonded net is ``graph`` (and, if given, with the operations' point group).

    Without operations, a cell that holds several translation-equivalent copies of the net (a centred
    or supercell setting) is decoded through the primitive net (``primitive_net``) and expanded back,
    so the net's full symmetry, also rotations the cell's basis cannot write, is imposed.
    """
    deadline = time.monotonic() + params.time_limit_s
    bonded = {k for e in graph.edges for k in e[:2]}
    if len(bonded) < graph.num_nodes:
        raise EmbeddingError(f"nodes {sorted(set(range(graph.num_nodes)) - bonded)} have no bonds")
    try:
        primitive = None
        if not symops and params.detect_symmetry:
            primitive = primitive_net(graph, _guess_metric(graph))
        if primitive is not None:
            lat, frac = primitive.expand(*_place(primitive.graph, (), params, deadline))
        else:
            lat, frac = _place(graph, symops, params, deadline)
    except _Timeout:
        raise DecodeTimeoutError(f"embedding exceeded its time box of {params.time_limit_s} s") from None
    except np.linalg.LinAlgError as err:
        raise EmbeddingError(f"degenerate cell or placement: {err}") from err
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(frac))):
        raise EmbeddingError("optimisation diverged")
    volume_per_atom = abs(np.linalg.det(lat)) / graph.num_nodes
    if volume_per_atom < _MIN_VOLUME_PER_ATOM:
        raise EmbeddingError(f"optimisation collapsed the cell ({volume_per_atom:.2f} Å^3 per atom)")
    closest = min_separation(frac, lat)
    if closest < _MIN_SEPARATION:
        raise EmbeddingError(f"two atoms end {closest:.2f} Å apart (below {_MIN_SEPARATION} Å)")
    wrapped, _ = shift_gauge(frac)
    return Structure(Lattice(lat), list(graph.species), wrapped)


def _guess_metric(graph: CrystalGraph) -> np.ndarray:
    """The initial metric tensor (Å²) of the barycentric placement, before any optimisation."""
    radii = np.array([bond_radius(s) for s in graph.species])
    volume = 1.5 * float(np.sum(4.0 / 3.0 * np.pi * radii**3))
    return initial_metric(graph, barycentric_placement(graph), bond_targets(graph), volume)


def _place(
    graph: CrystalGraph, symops: Sequence[SymOp], params: EmbeddingParams, deadline: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lattice (rows, Å) and fractional positions (in the gauge of the graph's offsets) of the embedding."""
    rng = np.random.default_rng(params.seed)
    kept, actions = symmetry_actions(graph, symops, deadline, params.strict_symmetry)
    rotations = np.array([op.matrices()[0] for op in kept], dtype=float).reshape(-1, 3, 3)
    frac = initial_positions(graph, rng)
    objective = _Objective(graph, params, deadline)
    metric = initial_metric(graph, frac, objective.targets, 1.5 * objective.volume0)
    if not len(rotations) and params.detect_symmetry:  # plain SLICES: the net's own symmetry
        rotations, actions = net_symmetry(graph, metric, min(_SYMMETRY_SEARCH_S, deadline - time.monotonic()))
        if not len(rotations):
            rotations, actions = detect_symmetry(graph, frac, np.linalg.cholesky(metric), _NET_SYMPRECS)
    if len(rotations):
        frac, metric = symmetrize(frac, metric, rotations, actions)
        frac = separate_symmetric(frac, metric, rotations, actions, rng)
        objective.symmetry = (rotations, np.array([sigma for sigma, _ in actions], dtype=int))
    lat, frac = _minimise(objective, np.linalg.cholesky(metric), frac, params)
    if not len(rotations) and params.detect_symmetry:  # symmetry blurred by a repaired placement
        rotations, actions = detect_symmetry(graph, frac, lat)
        if len(rotations) > 1:
            frac, metric = symmetrize(frac, lat @ lat.T, rotations, actions)
            lat, frac = _minimise(objective, np.linalg.cholesky(metric), frac, replace(params, refinements=0))
    if len(rotations):
        frac, metric = symmetrize(frac, lat @ lat.T, rotations, actions)
        lat = np.linalg.cholesky(metric)
    return lat, frac


RETRY_VARIANTS: tuple[dict[str, float], ...] = (
    {},
    {"seed": 1, "angle_slack": 0.9},
    {"seed": 2, "gap_factor": 1.3, "band_factor": 1.03},
    {"seed": 3, "pressure_weight": 0.1, "angle_weight": 3.0},
)
"""Parameter changes tried in turn by ``embed_checked`` until the decoded graph is the string's."""


def embed_checked(
    graph: CrystalGraph,
    symops: Sequence[SymOp],
    strategy: str,
    params: EmbeddingParams = EmbeddingParams(),
    attempts: int = len(RETRY_VARIANTS),
) -> Structure:
    """``embed``, re-run with the next ``RETRY_VARIANTS`` entry while the decoded crystal's graph (by
    ``strategy``) differs from ``graph``; returns the first matching crystal, else the first one built.

    With operations, a further attempt leaves them out (the net's own symmetry is used, as for plain
    SLICES): operations whose graph actions pin atoms onto each other are reported and dropped, not
    returned as a crystal with overlapping atoms. When no attempt builds a crystal, a last one imposes
    no symmetry at all. All attempts and their graph checks share the time box
    ``params.time_limit_s`` (an attempt is returned unchecked when its check, estimated by the last one,
    would end past it); the first error is raised when no attempt builds a crystal.
    """
    start = time.monotonic()
    # (operations, parameter changes, tried only when no earlier attempt built a crystal)
    plan = [(tuple(symops), changes, False) for changes in RETRY_VARIANTS[: max(1, attempts)]]
    if symops:
        plan.append(((), {}, False))
    if params.detect_symmetry:
        plan.append(((), {"detect_symmetry": False}, True))
    first: Structure | None = None
    first_error: CrystalDecodeError | None = None
    check_seconds = 0.0  # duration of the last graph check, the estimate of the next
    for operations, changes, last_resort in plan:
        remaining = params.time_limit_s - (time.monotonic() - start)
        if remaining <= 0 or (last_resort and first is not None):
            break
        try:
            structure = embed(graph, operations, replace(params, time_limit_s=remaining, **changes))
        except CrystalDecodeError as err:
            if not operations and symops:
                logger.warning("decoded without the symmetry part after: %s", first_error or err)
            first_error = first_error or err
            continue
        if time.monotonic() - start + check_seconds >= params.time_limit_s:  # no time to check it
            return first or structure
        check_start = time.monotonic()
        try:
            found = structure_to_graph(structure, strategy)
        except CrystalEncodeError:
            found = None
        check_seconds = time.monotonic() - check_start
        if found is not None and graphs_match(graph, found):
            return structure
        first = first or structure
    if first is not None:
        return first
    raise first_error or DecodeTimeoutError(f"embedding exceeded its time box of {params.time_limit_s} s")
