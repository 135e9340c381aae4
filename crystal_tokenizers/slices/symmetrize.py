"""Impose a written point group on a decoded crystal (the SLICES-PLUS ``"group"`` symmetry mode).

In the graph-consistent mode every written rotation acts on the string's graph, and the embedding is
built symmetric. In the group mode the grammar writes a closed point group of the requested crystal
system that need not act on the sampled graph; the decoder embeds the graph, then projects the crystal
onto the group:

1. metric: the Reynolds average ``G' = mean_R R^T G R`` (fractional rotations, ``G = L L^T`` in Å²),
   invariant under every ``R``;
2. positions: the origin ``p`` (an atom) about which the rotations best carry the crystal onto itself;
   with the translations ``t_R = (I - R) p`` and the atom maps ``pi_R`` (same species, Hungarian
   assignment on the metric distance), every atom is moved to the mean of its images
   ``R^-1 (x_pi(i) + n - t_R)``, repeated until converged;
3. orbits: each atom is replaced by its whole orbit (images closer than 0.5 Å merged into one special
   position, atoms that land on a placed site absorbed), so the group holds exactly; the site count can
   change, which the caller reports.

The result is judged elsewhere (spglib crystal system at symprec 0.1 Å, shortest distance, its own graph).
"""

from __future__ import annotations

import numpy as np
from pymatgen.core import Lattice, Structure
from scipy.optimize import linear_sum_assignment

PROJECTION_ROUNDS = 12
"""Most rounds of translation/assignment search and averaging (4 left 3 of 18 distorted paper crystals
short of their system, 8 none); the rounds stop once no atom moves by more than ``CONVERGED_FRAC``."""
CONVERGED_FRAC = 1e-6
MERGE_A = 0.5
"""Å: images of one atom closer than this are one site; the decoder's closest-approach bound."""


def symmetrized_metric(metric: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """``mean_R R^T G R``: the metric tensor (Å²) nearest to ``metric`` that every rotation preserves."""
    return np.mean(np.einsum("kji,jl,klm->kim", rotations, metric, rotations), axis=0)


def _wrapped(diff: np.ndarray) -> np.ndarray:
    return diff - np.round(diff)


def _sq_dist(diff: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """Squared lengths (Å²) of wrapped fractional differences (..., 3) under ``metric``."""
    d = _wrapped(diff)
    return np.einsum("...i,ij,...j->...", d, metric, d)


def _best_translation(frac: np.ndarray, species: np.ndarray, rotation: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """The translation ``t`` for which ``R x + t`` puts every atom nearest to an atom of its species."""
    rotated = frac @ rotation.T
    rare = min(set(species.tolist()), key=lambda s: (np.sum(species == s), s))
    anchor = int(np.flatnonzero(species == rare)[0])
    same = species[:, None] == species[None, :]
    best, best_cost = np.zeros(3), np.inf
    for target in np.flatnonzero(species == rare):
        t = frac[target] - rotated[anchor]
        dist = _sq_dist(rotated[:, None, :] + t - frac[None, :, :], metric)
        cost = float(np.where(same, dist, np.inf).min(axis=1).sum())
        if cost < best_cost:
            best, best_cost = t, cost
    return best


def _assignment(mapped: np.ndarray, frac: np.ndarray, species: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """``pi[i]``: the atom of the same species nearest to ``mapped[i]``, one-to-one within each species."""
    pi = np.empty(len(frac), dtype=int)
    for s in set(species.tolist()):
        idx = np.flatnonzero(species == s)
        cost = _sq_dist(mapped[idx][:, None, :] - frac[idx][None, :, :], metric)
        rows, cols = linear_sum_assignment(cost)
        pi[idx[rows]] = idx[cols]
    return pi


def project_positions(
    frac: np.ndarray, species: np.ndarray, rotations: np.ndarray, metric: np.ndarray, rounds: int = PROJECTION_ROUNDS,
    origin: np.ndarray | None = None,
) -> np.ndarray:
    """Fractional positions averaged over the group's images (see the module docstring), not wrapped.

    With ``origin`` the translations are ``(I - R) origin`` (a symmorphic group about it), else each
    rotation's best translation is searched and refined per round."""
    frac = np.array(frac, dtype=float)
    inverses = np.round(np.linalg.inv(rotations)).astype(float)
    for _ in range(rounds):
        images = np.zeros_like(frac)
        for rotation, inverse in zip(rotations.astype(float), inverses):
            fixed = origin is not None
            t = origin - rotation @ origin if fixed else _best_translation(frac, species, rotation, metric)
            mapped = frac @ rotation.T + t
            pi = _assignment(mapped, frac, species, metric)
            offset = np.round(mapped - frac[pi])  # lattice vector between the image and its partner
            if not fixed:
                t = t + np.mean(frac[pi] + offset - mapped, axis=0)  # least-squares translation for this map
            images += (frac[pi] + offset - t) @ inverse.T
        moved = float(np.abs(images / len(rotations) - frac).max())
        frac = images / len(rotations)
        if moved < CONVERGED_FRAC:
            break
    return frac


def closed_rotations(rotations: np.ndarray, max_order: int = 48) -> np.ndarray | None:
    """The group (k, 3, 3 integer) generated by ``rotations`` and the identity; None beyond ``max_order``."""
    group = {np.eye(3, dtype=int).tobytes(): np.eye(3, dtype=int)}
    for r in np.asarray(rotations, dtype=int).reshape(-1, 3, 3):
        group.setdefault(r.tobytes(), r)
    while True:
        new = {}
        for a in list(group.values()):
            for b in list(group.values()):
                p = a @ b
                if p.tobytes() not in group:
                    new[p.tobytes()] = p
        if not new:
            return np.array(list(group.values()))
        group.update(new)
        if len(group) > max_order:
            return None


def best_origin(frac: np.ndarray, species: np.ndarray, rotations: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """The origin ``p`` (an atom's position) about which ``x -> R (x - p) + p`` best maps the crystal onto
    itself: the smallest sum over rotations and atoms of the squared distance (Å²) to the nearest atom of
    the same species."""
    same = species[:, None] == species[None, :]
    best, best_cost = frac[0], np.inf
    for origin in frac:
        cost = 0.0
        for rotation in rotations:
            images = (frac - origin) @ rotation.T + origin
            dist = _sq_dist(images[:, None, :] - frac[None, :, :], metric)
            cost += float(np.where(same, dist, np.inf).min(axis=1).sum())
            if cost >= best_cost:
                break
        if cost < best_cost:
            best, best_cost = origin, cost
    return best


def orbit_snap(
    frac: np.ndarray, species: np.ndarray, rotations: np.ndarray, origin: np.ndarray, metric: np.ndarray,
    merge_a: float = MERGE_A,
) -> tuple[np.ndarray, np.ndarray]:
    """Atoms replaced by whole orbits of ``x -> R (x - p) + p`` (the group about ``origin``): images closer
    than ``merge_a`` Å are one site (their mean, a special position), an atom within ``merge_a`` of a site
    already placed for its species is absorbed, and an atom whose orbit would come within ``merge_a`` of
    placed sites is left out. Returns fractional positions and species."""
    sites: list[np.ndarray] = []
    kinds: list[str] = []
    tol2 = merge_a**2
    for x, kind in zip(frac, species):
        placed = [y for y, k in zip(sites, kinds) if k == kind]
        if placed and _sq_dist(np.array(placed) - x, metric).min() < tol2:
            continue
        clusters: list[list[np.ndarray]] = []
        for image in (x - origin) @ rotations.transpose(0, 2, 1) + origin:
            for cluster in clusters:
                if _sq_dist(image - cluster[0], metric) < tol2:
                    cluster.append(cluster[0] + _wrapped(image - cluster[0]))
                    break
            else:
                clusters.append([image])
        centres = [np.mean(cluster, axis=0) for cluster in clusters]
        if sites and _sq_dist(np.array(centres)[:, None, :] - np.array(sites)[None, :, :], metric).min() < tol2:
            continue  # the orbit would sit on atoms already placed: this atom is left out
        sites += centres
        kinds += [kind] * len(centres)
    return np.mod(np.array(sites), 1.0), np.array(kinds)


def impose_point_group(structure: Structure, rotations: np.ndarray, rounds: int = PROJECTION_ROUNDS) -> Structure:
    """``structure`` with the point group of ``rotations`` (k, 3, 3 integer, fractional basis, the identity
    among them) imposed: symmetrised metric; positions averaged over their images about the best origin
    (``best_origin``, so the translations ``(I - R) p`` form a group), then completed into whole orbits
    (``orbit_snap``: the result holds the group exactly, possibly with atoms merged or added; the number
    of sites before is kept in ``properties["sites_before_imposing"]``)."""
    rotations = np.asarray(rotations, dtype=int).reshape(-1, 3, 3)
    metric = symmetrized_metric(structure.lattice.matrix @ structure.lattice.matrix.T, rotations.astype(float))
    species = np.array([site.specie.symbol for site in structure])
    origin = best_origin(structure.frac_coords, species, rotations, metric)
    frac = project_positions(structure.frac_coords, species, rotations, metric, rounds, origin)
    frac, species = orbit_snap(frac, species, rotations.astype(float), origin, metric)
    lattice = Lattice(np.linalg.cholesky(metric))
    properties = {**structure.properties, "sites_before_imposing": len(structure)}
    return Structure(lattice, list(species), frac, properties=properties)


__all__ = ["MERGE_A", "PROJECTION_ROUNDS", "best_origin", "closed_rotations", "impose_point_group", "orbit_snap", "project_positions", "symmetrized_metric"]
