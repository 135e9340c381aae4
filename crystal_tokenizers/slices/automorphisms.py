"""Automorphisms of a labelled quotient graph: which rotations act on the net, and how.

An action maps node ``i`` onto node ``sigma[i]`` in the cell ``shifts[i]``. Read off the barycentric
placement when it puts no two nodes on one point (it is then equivariant), else found by a budgeted
backtracking search; products of found operations are composed. Also the symmetry of a placed crystal
(spglib) restricted to graph automorphisms, and the Reynolds projection of positions and metric onto
a group (``symmetrize``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystal_tokenizers.errors import SymmetryMismatchError
from crystal_tokenizers.slices.codec import SymOp
from crystal_tokenizers.slices.graph import CrystalGraph, orient_edge
from crystal_tokenizers.slices.placement import barycentric_placement, has_collision
from crystal_tokenizers.slices.rotations import MAX_POINT_GROUP_ORDER, reduced_basis, rotation_algebra

logger = logging.getLogger(__name__)

_SEPARATION_STEPS = (0.02, 0.05, 0.1)  # fractional scales of the symmetric kicks that part coincident atoms
NET_SYMPRECS = (0.01,)
"""Å, tolerance for the exact symmetry of a barycentric placement."""
_DETECT_SYMPRECS = (0.3, 0.1, 0.03)  # Å, tolerances tried when reading the symmetry of a plain-SLICES decode
PLACEMENT_MATCH = 1e-6
"""Fractional distance within which a mapped barycentric node lies on a node."""
_MAX_AUTOMORPHISM_STEPS = 500
SYMMETRY_SEARCH_S = 1.0
"""Time budget (s) of the backtracking automorphism searches per decode."""

Action = tuple[list[int], np.ndarray]
"""How an operation acts on the nodes: it maps node ``i`` onto node ``sigma[i]`` in the cell ``shifts[i]``."""


class _SearchExhausted(Exception):
    """Raised when the automorphism search used up its step budget."""



def maps_edges(graph: CrystalGraph, rotation: np.ndarray, sigma: Sequence[int], shifts: np.ndarray) -> bool:
    """Whether ``(sigma, shifts)`` maps every edge ``(i, j, v)`` to the edge ``(sigma i, sigma j, R v + s_j - s_i)``."""
    edges = np.array(graph.edges, dtype=int)
    sig = np.asarray(sigma)
    mapped = edges[:, 2:] @ rotation.T + shifts[edges[:, 1]] - shifts[edges[:, 0]]
    images = {orient_edge((int(a), int(b), *map(int, v))) for a, b, v in zip(sig[edges[:, 0]], sig[edges[:, 1]], mapped)}
    return images == set(graph.edges)


def automorphism_from_placement(graph: CrystalGraph, rotation: np.ndarray, placement: np.ndarray) -> Action | None:
    """One action of an automorphism with linear part ``rotation`` read off the placement, or None."""
    actions = placement_actions(graph, rotation, placement, limit=1)
    return actions[0] if actions else None


def automorphism_search(graph: CrystalGraph, rotation: np.ndarray, deadline: float) -> Action | None:
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
    time_limit_s: float = SYMMETRY_SEARCH_S,
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
        action = automorphism_from_placement(graph, rotations[k], placement)
        if action is not None:
            found[int(k)] = action
    if has_collision(placement):
        deadline = time.monotonic() + time_limit_s
        for k in candidates:
            if time.monotonic() > deadline:
                break
            if int(k) not in found:
                action = automorphism_search(graph, rotations[k], deadline)
                if action is not None:
                    found[int(k)] = action
    return found


def graph_automorphism_rotations(
    graph: CrystalGraph, rotations: np.ndarray, time_limit_s: float = SYMMETRY_SEARCH_S
) -> np.ndarray:
    """Which of ``rotations`` (n, 3, 3) are linear parts of automorphisms of the graph (bool, n; see
    ``graph_automorphisms``)."""
    mask = np.zeros(len(rotations), dtype=bool)
    mask[list(graph_automorphisms(graph, rotations, time_limit_s))] = True
    return mask


def net_symmetry(
    graph: CrystalGraph, metric: np.ndarray | None = None, time_limit_s: float = SYMMETRY_SEARCH_S
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
    for basis in (np.eye(3), reduced_basis(np.eye(3), np.eye(3) if metric is None else metric)):
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
    if np.max(dist[rows, nodes]) > PLACEMENT_MATCH:
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
    search_deadline = min(deadline, time.monotonic() + SYMMETRY_SEARCH_S)
    found: dict[bytes, Action] = {}
    rotations = [op.matrices()[0] for op in symops]
    for rotation in rotations:
        key = rotation.tobytes()
        if key in found:
            continue
        action = automorphism_from_placement(graph, rotation, placement)
        if action is None and time.monotonic() < search_deadline:
            action = automorphism_search(graph, rotation, search_deadline)
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
    return (sigma.tolist(), shifts) if maps_edges(graph, rotation, sigma, shifts) else None


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

