"""The placement objective: energy and analytic gradient of a cell and fractional positions.

Harmonic bond lengths toward the fitted model of ``slices.radii``; a one-sided term keeping two
neighbours of an atom at least the smallest angle of the ideal polyhedron apart; a one-sided repulsion
between non-bonded atoms; a weak pressure. ``PlacementObjective.tighten`` then keeps every bond within
``band_factor`` and every non-bonded pair beyond ``gap_factor`` of the two atoms' shortest bonds (the
MinimumDistanceNN rule). Minimised by scipy L-BFGS-B (``minimise``), gradients projected onto the
symmetric subspace when operations are imposed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from crystal_tokenizers.slices.graph import CrystalGraph
from crystal_tokenizers.slices.placement import IMAGES, ZERO_IMAGE, bond_radius, bond_targets, edge_arrays, neighbour_pairs


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
    """Re-optimisations with the bond band and gaps of ``PlacementObjective.tighten`` (0 disables them)."""
    band_factor: float = 1.04
    gap_factor: float = 1.2
    band_weight: float = 4.0
    max_iterations: int = 400
    time_limit_s: float = 10.0
    seed: int = 0
    strict_symmetry: bool = False
    """Raise ``SymmetryMismatchError`` (instead of leaving operations out) for inconsistent operations."""



class ObjectiveTimeout(Exception):
    """Raised inside the objective when the time box is exceeded."""



_TRIL = np.tril_indices(3)


def _incidence(pairs: np.ndarray, n: int) -> np.ndarray:
    """Dense incidence matrix (len(pairs), n): +1 at the second node of each pair, -1 at the first (0 for a loop)."""
    matrix = np.zeros((len(pairs), n))
    rows = np.arange(len(pairs))
    np.add.at(matrix, (rows, pairs[:, 1]), 1.0)
    np.add.at(matrix, (rows, pairs[:, 0]), -1.0)
    return matrix


class PlacementObjective:
    """Energy and analytic gradient of cell (6 lower-triangular entries) + fractional positions."""

    def __init__(self, graph: CrystalGraph, params: EmbeddingParams, deadline: float) -> None:
        n = graph.num_nodes
        self.n, self.params, self.deadline = n, params, deadline
        self.pairs, self.offsets = edge_arrays(graph)
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
        self.exclude = np.zeros((len(iu), len(IMAGES)), dtype=bool)
        self.exclude[iu == ju, ZERO_IMAGE] = True
        radii = np.array([bond_radius(s) for s in graph.species])
        self.volume0 = float(np.sum(4.0 / 3.0 * np.pi * radii**3))
        self.loops = self.pairs[:, 0] == self.pairs[:, 1]
        self.symmetry: tuple[np.ndarray, np.ndarray] | None = None  # (rotations K x 3 x 3, permutations K x n)
        self.angle_pairs, self.angle_offsets, self.angle_minima = neighbour_pairs(graph, self.targets, params.angle_slack)
        self.bond_incidence = _incidence(self.pairs, n)
        self.angle_incidence = _incidence(self.angle_pairs, n)
        self.pair_incidence = _incidence(np.column_stack([iu, ju]), n)

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
        a[_TRIL] = x[:6]
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
            raise ObjectiveTimeout
        lat = self.lattice(x)
        frac = x[6:].reshape(self.n, 3)
        p = self.params
        # bonds: delta = f_j - f_i + v through the incidence matrix (rows +1 at j, -1 at i)
        delta = self.bond_incidence @ frac + self.offsets
        cart = delta @ lat
        length = np.sqrt(np.einsum("ij,ij->i", cart, cart)) + 1e-12
        resid = (length - self.targets) / self.targets
        excess = np.maximum(length - self.band, 0.0) / self.targets
        energy = float(resid @ resid + p.band_weight * (excess @ excess))
        g_cart = ((2 * resid + 2 * p.band_weight * excess) / self.targets / length)[:, None] * cart
        grad_lat = delta.T @ g_cart
        grad_frac = self.bond_incidence.T @ (g_cart @ lat.T)
        # neighbours of one atom kept apart (bond angles): only pairs closer than their minimum count
        if len(self.angle_minima):
            adelta = self.angle_incidence @ frac + self.angle_offsets
            acart = adelta @ lat
            alen = np.sqrt(np.einsum("ij,ij->i", acart, acart)) + 1e-12
            ashort = np.maximum(self.angle_minima - alen, 0.0) / self.angle_minima
            energy += p.angle_weight * float(ashort @ ashort)
            g_acart = (-2 * p.angle_weight * ashort / self.angle_minima / alen)[:, None] * acart
            grad_lat += adelta.T @ g_acart
            grad_frac += self.angle_incidence.T @ (g_acart @ lat.T)
        # repulsion between non-bonded image pairs (only the few closer than their radius)
        base = self.pair_incidence @ frac
        base -= np.round(base)
        rcart = (base @ lat)[:, None, :] + self.image_cart(lat)[None, :, :]
        rlen = np.sqrt(np.einsum("pki,pki->pk", rcart, rcart)) + 1e-12
        close = rlen < self.rmin[:, None]
        if close.any():
            close &= ~self._bonded_images(frac)
            pair, image = np.nonzero(close)
            rmin = self.rmin[pair]
            length_close = rlen[pair, image]
            over = (rmin - length_close) / rmin
            energy += p.repulsion_weight * float(over @ over)
            g_rcart = (-2 * p.repulsion_weight * over / rmin / length_close)[:, None] * rcart[pair, image]
            rdelta = base[pair] + IMAGES[image]
            grad_lat += rdelta.T @ g_rcart
            g_pair = np.zeros((len(self.rmin), 3))
            np.add.at(g_pair, pair, g_rcart @ lat.T)
            grad_frac += self.pair_incidence.T @ g_pair
        # pressure
        volume = abs(float(np.linalg.det(lat)))
        pw = p.pressure_weight / self.volume0
        energy += pw * volume
        grad_lat += pw * volume * np.linalg.inv(lat).T
        if self.symmetry is not None:  # stay in the symmetric subspace: g_i <- mean_k R_k^T g_sigma_k(i)
            rotations, sigmas = self.symmetry
            grad_frac = np.einsum("kni,kij->nj", grad_frac[sigmas], rotations) / len(rotations)
        return energy, np.concatenate([grad_lat[_TRIL], grad_frac.ravel()])

    @staticmethod
    def image_cart(lat: np.ndarray) -> np.ndarray:
        """Cartesian vectors (Å) of the 27 neighbouring cells."""
        return IMAGES @ lat


def minimise(
    objective: PlacementObjective, lat: np.ndarray, frac: np.ndarray, params: EmbeddingParams
) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS-B from a lower-triangular cell and positions, then ``params.refinements`` re-runs."""
    x = np.concatenate([lat[_TRIL], frac.ravel()])
    options = {"maxiter": params.max_iterations}
    x = minimize(objective, x, jac=True, method="L-BFGS-B", options=options).x
    for _ in range(params.refinements):
        objective.tighten(x)
        x = minimize(objective, x, jac=True, method="L-BFGS-B", options=options).x
    return PlacementObjective.lattice(x), x[6:].reshape(-1, 3)

