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
            raise ObjectiveTimeout
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
        rdelta = base[:, None, :] + IMAGES[None, :, :]
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



def minimise(
    objective: PlacementObjective, lat: np.ndarray, frac: np.ndarray, params: EmbeddingParams
) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS-B from a lower-triangular cell and positions, then ``params.refinements`` re-runs."""
    x = np.concatenate([lat[np.tril_indices(3)], frac.ravel()])
    options = {"maxiter": params.max_iterations}
    x = minimize(objective, x, jac=True, method="L-BFGS-B", options=options).x
    for _ in range(params.refinements):
        objective.tighten(x)
        x = minimize(objective, x, jac=True, method="L-BFGS-B", options=options).x
    return PlacementObjective.lattice(x), x[6:].reshape(-1, 3)

