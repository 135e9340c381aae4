"""Evaluation of generated crystals: validity, uniqueness, novelty, symmetry, property targets, stability.

The metrics follow the generative-crystal literature:

* structural validity: every interatomic distance, periodic images included, is above 0.5 Å and the cell
  volume is above 0.1 Å³ (CDVAE, Xie et al., ICLR 2022, ``structure_validity``);
* compositional validity: SMACT charge neutrality plus the Pauling electronegativity test, with CDVAE's
  short cuts (a single-element crystal is valid; an all-metal crystal is valid as an alloy) and the SMACT
  2014 oxidation-state table that CDVAE's numbers were computed with (``smact_validity`` in CDVAE's
  ``eval_utils.py``; SMACT >= 3 defaults to the ICSD-24 table instead, selectable here);
* uniqueness and novelty: pymatgen ``StructureMatcher`` (default tolerances) within the generated set and
  against a reference set, behind a composition-keyed prefilter that is exact because the matcher itself
  never matches two structures of different reduced composition;
* space-group consistency and crystal-system hit rate: the spglib group at ``symprec`` 0.1 against a
  declared space group or a target crystal system (SLICES-PLUS reports the share of valid samples in the
  target crystal system);
* distribution distances to the reference set: Wasserstein distances of density and of the number of
  elements (CDVAE's property statistics);
* property targeting: a predictor (any ``structures -> values`` function) judges the valid samples
  against per-structure or constant targets;
* stability (optional): energies per atom from an ML interatomic potential (CHGNet, the ``mlip`` extra) and
  energies above a hull built with pymatgen's ``PhaseDiagram`` from the reference set's energies computed
  with the same potential, so that model errors partly cancel.

Uniqueness, novelty, the symmetry metrics, property metrics, stability and the histograms are computed
over the *valid samples* (structurally and compositionally valid, CDVAE's ``valid``); the validity
fractions are over all ``n`` inputs, an unparsable input counting as invalid.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import spglib
from pymatgen.analysis.phase_diagram import PhaseDiagram
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Element, Structure
from pymatgen.entries.computed_entries import ComputedEntry
from scipy.stats import wasserstein_distance
from smact.screening import smact_validity as _smact_validity

from crystal_tokenizers import CRYSTAL_SYSTEMS, crystal_system
from training.io import ProgressFn, no_progress

logger = logging.getLogger(__name__)

MIN_DISTANCE_A = 0.5
"""Smallest allowed interatomic distance in Å (CDVAE's structural-validity cut-off)."""
MIN_VOLUME_A3 = 0.1
"""Smallest allowed cell volume in Å³ (CDVAE's structural-validity volume check)."""
SYMPREC_JUDGE_A = 0.1
"""spglib distance tolerance in Å for judging the symmetry of generated crystals."""
OXIDATION_STATES_SET = "smact14"
"""SMACT oxidation-state table used by CDVAE's ``smact_validity`` (SMACT 2.x default)."""
STABILITY_THRESHOLD_EV = 0.1
"""Energy above hull in eV/atom under which a crystal counts as (meta)stable (MatterGen's S.U.N. cut)."""
SPACEGROUP_KEY = "spacegroup"
"""Target key (and CSV column) of declared space-group numbers."""
CRYSTAL_SYSTEM_KEY = "crystal_system"
"""Target key (and CSV column) of target crystal systems (a name or the integer 0-6)."""

_MAX_TARGET_MARKERS = 10
_T = TypeVar("_T")
PropertyPredictor = Callable[[Sequence[Structure]], np.ndarray]
"""A function from structures to one predicted value per structure (in the property's units)."""
EnergyModel = Callable[[Sequence[Structure]], np.ndarray]
"""A function from structures to energies in eV/atom (NaN where the model fails)."""


# ----------------------------------------------------------------------------------------------------
# Single-structure metrics


def is_structurally_valid(
    structure: Structure, min_distance: float = MIN_DISTANCE_A, min_volume: float = MIN_VOLUME_A3
) -> bool:
    """True if no two atoms, periodic images included (an atom's own too), are closer than ``min_distance`` Å.

    A cell under ``min_volume`` Å³ or with non-finite parameters is invalid. The pair search is pymatgen's
    compiled cell-list search (``get_neighbor_list``), exact for any cell shape.
    """
    lattice = structure.lattice
    if not (np.all(np.isfinite(lattice.matrix)) and np.all(np.isfinite(structure.frac_coords))):
        return False
    if not lattice.volume > min_volume:
        return False
    _, _, _, distances = structure.get_neighbor_list(r=min_distance, exclude_self=True)
    return not np.any(distances < min_distance)


def is_compositionally_valid(composition: Composition, oxidation_states_set: str = OXIDATION_STATES_SET) -> bool:
    """SMACT charge neutrality + Pauling electronegativity test, as CDVAE's ``smact_validity``.

    Single-element compositions and all-metal compositions (alloys) are valid without the test, as in
    CDVAE. Elements missing from SMACT's data make a composition invalid.
    """
    try:
        with warnings.catch_warnings():  # SMACT warns about elements without a Pauling electronegativity
            warnings.simplefilter("ignore")
            valid = _smact_validity(
                composition.element_composition,
                use_pauling_test=True,
                include_alloys=True,
                oxidation_states_set=oxidation_states_set,
            )
    except KeyError:
        return False
    return bool(valid)


def spacegroup_number(structure: Structure, symprec: float = SYMPREC_JUDGE_A) -> int | None:
    """International space-group number found by spglib at ``symprec`` Å, or None if spglib fails."""
    cell = (structure.lattice.matrix, structure.frac_coords, np.array(structure.atomic_numbers))
    with warnings.catch_warnings():  # spglib 2.x warns about its legacy None-on-failure error handling
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    return None if dataset is None else int(dataset.number)


crystal_system_of = crystal_system
"""Crystal system of an international space-group number (1-230): ``crystal_tokenizers.crystal_system``."""


def normalize_crystal_system(value: str | int) -> str:
    """Crystal-system name from a name (any case) or the shared data's integer label 0-6."""
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < len(CRYSTAL_SYSTEMS):
            raise ValueError(f"crystal-system label {index} is not in 0-6")
        return CRYSTAL_SYSTEMS[index]
    name = str(value).strip().lower()
    if name not in CRYSTAL_SYSTEMS:
        raise ValueError(f"unknown crystal system {value!r}; expected one of {', '.join(CRYSTAL_SYSTEMS)} or 0-6")
    return name


def _composition_key(structure: Structure) -> str:
    """Reduced element formula: StructureMatcher never matches structures whose keys differ."""
    return structure.composition.element_composition.reduced_formula


# ----------------------------------------------------------------------------------------------------
# Set metrics


def structures_match(matcher: StructureMatcher, a: Structure, b: Structure) -> bool:
    """True if ``matcher`` fits ``a`` to ``b`` in either order.

    ``StructureMatcher.fit`` is not symmetric (its supercell search and its site tolerance depend on which
    structure comes first), and its ``symmetric=True`` asks for a fit in both orders. Uniqueness and
    novelty take a fit in either order as a match, so they are never overstated.
    """
    return bool(matcher.fit(a, b) or matcher.fit(b, a))


def duplicate_of(structures: Sequence[Structure], matcher: StructureMatcher | None = None) -> list[int | None]:
    """For each structure, the index of an earlier structure it matches, or None if it is the first of its kind.

    Greedy clustering against the first member of each class, only within groups of equal reduced
    composition (an exact prefilter for StructureMatcher).
    """
    matcher = matcher or StructureMatcher()
    groups: dict[str, list[int]] = defaultdict(list)
    for index, structure in enumerate(structures):
        groups[_composition_key(structure)].append(index)
    result: list[int | None] = [None] * len(structures)
    for members in groups.values():
        representatives: list[int] = []
        for index in members:
            match = next((rep for rep in representatives if structures_match(matcher, structures[rep], structures[index])),
                         None)
            if match is None:
                representatives.append(index)
            result[index] = match
    return result


def is_novel(
    structures: Sequence[Structure], reference: Sequence[Structure], matcher: StructureMatcher | None = None
) -> list[bool]:
    """For each structure, True if it matches no reference structure (composition-keyed prefilter first)."""
    matcher = matcher or StructureMatcher()
    by_key: dict[str, list[Structure]] = defaultdict(list)
    for ref in reference:
        by_key[_composition_key(ref)].append(ref)
    return [
        not any(structures_match(matcher, ref, structure) for ref in by_key.get(_composition_key(structure), ()))
        for structure in structures
    ]


def element_histogram(structures: Iterable[Structure]) -> dict[str, int]:
    """Number of structures containing each element, ordered by atomic number."""
    counts = Counter(el.symbol for s in structures for el in s.composition.elements)
    return {symbol: counts[symbol] for symbol in sorted(counts, key=lambda sym: Element(sym).Z)}


def _ordered_histogram(values: Iterable[Any], order: Sequence[Any]) -> dict[str, int]:
    counts = Counter(v for v in values if v is not None)
    return {str(key): counts[key] for key in order if counts[key]}


def _wasserstein(a: Sequence[float], b: Sequence[float]) -> float | None:
    return float(wasserstein_distance(a, b)) if len(a) and len(b) else None


# ----------------------------------------------------------------------------------------------------
# Stability


def chgnet_energy_per_atom(structures: Sequence[Structure], batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Static (unrelaxed) CHGNet 0.3.0 energies in eV/atom; NaN where CHGNet cannot build a crystal graph.

    Needs the ``mlip`` extra (``pip install 'crystal-lm[mlip]'``); the weights ship inside the chgnet wheel.
    """
    try:
        from chgnet.model import CHGNet
    except ImportError as err:
        raise ImportError("energy estimates need chgnet: pip install 'crystal-lm[mlip]'") from err
    with contextlib.redirect_stdout(io.StringIO()) as banner:
        model = CHGNet.load(use_device=device, verbose=False)
    logger.info("loaded %s", banner.getvalue().strip())
    energies = np.full(len(structures), np.nan)
    with warnings.catch_warnings():  # chgnet warns about converting a tensor that requires grad
        warnings.simplefilter("ignore", UserWarning)
        for start in range(0, len(structures), batch_size):
            batch = list(structures[start : start + batch_size])
            try:
                energies[start : start + len(batch)] = _chgnet_energies(model, batch)
            except (ValueError, RuntimeError):  # one bad crystal graph fails its batch: retry one by one
                for offset, structure in enumerate(batch):
                    with contextlib.suppress(ValueError, RuntimeError):
                        energies[start + offset] = _chgnet_energies(model, [structure])[0]
    return energies


def _chgnet_energies(model: Any, structures: list[Structure]) -> list[float]:
    predictions = model.predict_structure(structures, task="e", batch_size=len(structures))
    predictions = [predictions] if isinstance(predictions, dict) else predictions  # one structure: one dict
    return [float(p["e"]) for p in predictions]


def energies_above_hull(
    structures: Sequence[Structure],
    energies_per_atom: np.ndarray,
    reference: Sequence[Structure],
    reference_energies_per_atom: np.ndarray,
    elemental_energies: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Energy above the reference convex hull in eV/atom (negative: below it); NaN where no hull exists.

    The hull of each structure's chemical system is built with ``PhaseDiagram`` from the reference
    structures whose elements are a subset of it. Every element needs a terminal entry: an elemental
    reference structure, or else an energy per atom from ``elemental_energies`` (e.g.
    ``fit_elemental_energies``); without one the hull is undefined and the value is NaN.
    """
    by_system: dict[frozenset[str], list[ComputedEntry]] = defaultdict(list)
    for ref, energy in zip(reference, reference_energies_per_atom, strict=True):
        if np.isfinite(energy):
            comp = ref.composition.element_composition
            by_system[frozenset(el.symbol for el in comp.elements)].append(ComputedEntry(comp, energy * comp.num_atoms))
    for symbol, energy in (elemental_energies or {}).items():
        if frozenset([symbol]) not in by_system:
            by_system[frozenset([symbol])].append(ComputedEntry(Composition(symbol), energy))
    result = np.full(len(structures), np.nan)
    diagrams: dict[frozenset[str], PhaseDiagram | None] = {}
    for index, (structure, energy) in enumerate(zip(structures, energies_per_atom, strict=True)):
        system = frozenset(el.symbol for el in structure.composition.elements)
        if system not in diagrams:
            diagrams[system] = _phase_diagram(system, by_system)
        diagram = diagrams[system]
        if diagram is not None and np.isfinite(energy):
            result[index] = energy - diagram.get_hull_energy_per_atom(structure.composition.element_composition)
    return result


def _phase_diagram(
    system: frozenset[str], by_system: Mapping[frozenset[str], list[ComputedEntry]]
) -> PhaseDiagram | None:
    """Hull of a chemical system from the entries of all its subsystems; None without every terminal entry."""
    subsystems = (frozenset(c) for k in range(1, len(system) + 1) for c in itertools.combinations(sorted(system), k))
    entries = [entry for sub in subsystems for entry in by_system.get(sub, ())]
    try:
        return PhaseDiagram(entries, elements=[Element(symbol) for symbol in sorted(system)])
    except ValueError as err:  # missing terminal (elemental) entries
        logger.debug("no hull for %s: %s", "-".join(sorted(system)), err)
        return None


def fit_elemental_energies(
    structures: Sequence[Structure], energies_per_atom: np.ndarray, formation_energies_per_atom: np.ndarray
) -> tuple[dict[str, float], float | None]:
    """Elemental reference energies in eV/atom on the energy model's scale, and the fit's RMS residual.

    Least squares over the reference set: ``E_model(s) - E_form(s) = sum_el x_el(s) * mu_el`` with ``x``
    the atomic fractions and ``E_form`` the reference formation energy (e.g. MP's, eV/atom). Because the
    equation is linear in composition, per-element energy corrections (MP2020) are absorbed in ``mu``. Only
    elements that the equations determine (outside the null space) are returned. This supplies the
    terminal hull entries that a reference set without elemental crystals (such as MP-20) lacks.
    """
    known = np.isfinite(energies_per_atom) & np.isfinite(formation_energies_per_atom)
    rows = np.flatnonzero(known)
    if not len(rows):
        return {}, None
    symbols = sorted({el.symbol for i in rows for el in structures[i].composition.elements}, key=lambda x: Element(x).Z)
    column = {symbol: k for k, symbol in enumerate(symbols)}
    fractions = np.zeros((len(rows), len(symbols)))
    for r, i in enumerate(rows):
        composition = structures[i].composition.element_composition.fractional_composition
        for el, x in composition.items():
            fractions[r, column[el.symbol]] = x
    offsets = energies_per_atom[rows] - formation_energies_per_atom[rows]
    mu, *_ = np.linalg.lstsq(fractions, offsets, rcond=None)
    eigenvalues, eigenvectors = np.linalg.eigh(fractions.T @ fractions)  # null space of the equations
    null_space = eigenvectors[:, eigenvalues <= eigenvalues.max() * 1e-12]
    undetermined = np.abs(null_space).max(axis=1, initial=0.0) > 1e-6
    rms = float(np.sqrt(np.mean((fractions @ mu - offsets) ** 2)))
    return {symbol: float(mu[k]) for k, symbol in enumerate(symbols) if not undetermined[k]}, rms


def _reference_energies_in_systems(
    structures: Sequence[Structure], reference: Sequence[Structure], energy_model: EnergyModel
) -> np.ndarray:
    """Energies of only the reference structures that can enter one of the generated chemical systems."""
    systems = {frozenset(el.symbol for el in s.composition.elements) for s in structures}
    needed = [
        i for i, ref in enumerate(reference) if any({el.symbol for el in ref.composition.elements} <= s for s in systems)
    ]
    energies = np.full(len(reference), np.nan)
    if needed:
        energies[needed] = energy_model([reference[i] for i in needed])
    return energies


# ----------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class StructureRecord:
    """Per-structure results; metrics that were not computed are None."""

    index: int
    id: str
    formula: str | None
    error: str | None
    structurally_valid: bool
    compositionally_valid: bool
    spacegroup: int | None = None
    crystal_system: str | None = None
    declared_spacegroup: int | None = None
    target_crystal_system: str | None = None
    duplicate_of: int | None = None
    novel: bool | None = None
    energy_per_atom_ev: float | None = None
    e_above_hull_ev: float | None = None
    predicted: Mapping[str, float] = field(default_factory=dict)
    target: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationReport:
    """Metrics of a set of generated crystals; fractions are in [0, 1], None where not computed."""

    n: int
    n_parsed: int
    n_valid_samples: int
    structural_validity: float
    compositional_validity: float
    validity: float
    uniqueness: float | None
    novelty: float | None
    unique_novel: float | None
    spg_consistency: float | None
    crystal_system_hit_rate: float | None
    density_wdist_g_cm3: float | None
    n_elements_wdist: float | None
    energy: Mapping[str, float | int | None] | None
    properties: Mapping[str, Mapping[str, float | int | None]]
    parse_errors: Mapping[str, int]
    histograms: Mapping[str, Mapping[str, int]]
    reference_histograms: Mapping[str, Mapping[str, int]] | None
    settings: Mapping[str, Any]
    timings_s: Mapping[str, float]
    records: tuple[StructureRecord, ...] = ()

    def to_dict(self, include_records: bool = False) -> dict[str, Any]:
        """JSON-ready dictionary (NaN becomes None); per-structure records only on request."""
        data = asdict(self)
        records = data.pop("records")
        if include_records:
            data["records"] = records
        return _json_ready(data)


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _fraction(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _per_structure(value: Any, n: int, name: str) -> list[Any]:
    """Broadcast a scalar target to n structures, or check that a sequence has n entries."""
    if isinstance(value, (str, int, float, np.number)) or value is None:
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"target {name!r} has {len(values)} values for {n} structures")
    return values


def _symmetry_targets(targets: Mapping[str, Any], n: int) -> tuple[list[int | None], list[str | None]]:
    """Declared space-group numbers and target crystal-system names per structure (None: no target)."""
    declared = [
        None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
        for v in _per_structure(targets.get(SPACEGROUP_KEY), n, SPACEGROUP_KEY)
    ]
    systems = [
        None if v is None or (isinstance(v, float) and math.isnan(v)) else normalize_crystal_system(v)
        for v in _per_structure(targets.get(CRYSTAL_SYSTEM_KEY), n, CRYSTAL_SYSTEM_KEY)
    ]
    return declared, systems


def evaluate_structures(
    structures: Sequence[Structure | None],
    reference: Sequence[Structure | None] | None = None,
    targets: Mapping[str, Any] | None = None,
    *,
    ids: Sequence[str] | None = None,
    parse_errors: Sequence[str | None] | None = None,
    predictors: Mapping[str, PropertyPredictor] | None = None,
    energy_model: EnergyModel | None = None,
    reference_formation_energies: Sequence[float | None] | None = None,
    matcher: StructureMatcher | None = None,
    min_distance: float = MIN_DISTANCE_A,
    symprec: float = SYMPREC_JUDGE_A,
    oxidation_states_set: str = OXIDATION_STATES_SET,
    progress: ProgressFn | None = None,
) -> EvaluationReport:
    """Evaluate generated crystals (None entries are inputs that failed to parse, counted as invalid).

    ``targets`` maps a name to one value or one value per structure: ``"spacegroup"`` (declared group
    numbers), ``"crystal_system"`` (names or 0-6), and property names judged by ``predictors[name]``.
    ``reference`` (e.g. the training set) enables novelty, distribution distances and the hull;
    ``reference_formation_energies`` (eV/atom, one per reference entry) complete missing elemental hull
    terminals through ``fit_elemental_energies``.
    """
    progress = progress or no_progress
    targets = dict(targets or {})
    predictors = dict(predictors or {})
    matcher = matcher or StructureMatcher()
    n = len(structures)
    ids = [str(i) for i in range(n)] if ids is None else list(ids)
    errors = [None if s is not None else "ParseError" for s in structures] if parse_errors is None else list(parse_errors)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    parsed = [i for i, s in enumerate(structures) if s is not None]
    structural = {
        i: is_structurally_valid(structures[i], min_distance)
        for i in progress(parsed, desc="distances", total=len(parsed))
    }
    lap("structural_validity")
    compositional = _compositional_validities({i: structures[i].composition for i in parsed}, oxidation_states_set)
    lap("compositional_validity")

    valid = [i for i in parsed if structural[i] and compositional[i]]
    valid_structures = [structures[i] for i in valid]
    groups = {i: spacegroup_number(structures[i], symprec) for i in progress(valid, desc="symmetry", total=len(valid))}
    lap("symmetry")
    duplicates = dict(zip(valid, _remap(duplicate_of(valid_structures, matcher), valid), strict=True))
    lap("uniqueness")
    reference_structures = [s for s in (reference or ()) if s is not None]
    reference_formation = None
    if reference is not None and reference_formation_energies is not None:
        pairs = zip(reference, reference_formation_energies, strict=True)
        reference_formation = np.array([np.nan if e is None else float(e) for s, e in pairs if s is not None])
    novel: dict[int, bool] = {}
    if reference is not None:
        novel = dict(zip(valid, is_novel(valid_structures, reference_structures, matcher), strict=True))
    lap("novelty")

    declared, target_systems = _symmetry_targets(targets, n)
    with_group = [i for i in valid if declared[i] is not None]
    with_system = [i for i in valid if target_systems[i] is not None]
    systems = {i: None if groups[i] is None else crystal_system(groups[i]) for i in valid}

    predicted, property_targets, properties = _property_metrics(valid_structures, valid, targets, predictors, n)
    lap("properties")
    energies, hull, energy_summary = _energy_metrics(
        valid_structures, valid, reference_structures, energy_model, duplicates, novel, reference_formation
    )
    lap("energy")

    records = tuple(
        StructureRecord(
            index=i,
            id=ids[i],
            formula=None if structures[i] is None else structures[i].composition.reduced_formula,
            error=errors[i],
            structurally_valid=structural.get(i, False),
            compositionally_valid=compositional.get(i, False),
            spacegroup=groups.get(i),
            crystal_system=systems.get(i),
            declared_spacegroup=declared[i],
            target_crystal_system=target_systems[i],
            duplicate_of=duplicates.get(i),
            novel=novel.get(i),
            energy_per_atom_ev=energies.get(i),
            e_above_hull_ev=hull.get(i),
            predicted={name: values[i] for name, values in predicted.items() if i in values},
            target={name: values[i] for name, values in property_targets.items() if values[i] is not None},
        )
        for i in range(n)
    )
    histograms = _histograms(valid_structures, [groups[i] for i in valid])
    reference_histograms, density_wdist, n_elements_wdist = None, None, None
    if reference is not None:
        reference_histograms, density_wdist, n_elements_wdist = _reference_statistics(
            valid_structures, reference_structures, symprec, progress
        )
    lap("reference_statistics")
    unique_count = sum(duplicates[i] is None for i in valid)
    return EvaluationReport(
        n=n,
        n_parsed=len(parsed),
        n_valid_samples=len(valid),
        structural_validity=_fraction(sum(structural.values()), n) or 0.0,
        compositional_validity=_fraction(sum(compositional.values()), n) or 0.0,
        validity=_fraction(sum(structural[i] and compositional[i] for i in parsed), n) or 0.0,
        uniqueness=_fraction(unique_count, len(valid)),
        novelty=_fraction(sum(novel.values()), len(valid)) if reference is not None else None,
        unique_novel=(
            None if reference is None else _fraction(sum(novel[i] and duplicates[i] is None for i in valid), len(valid))
        ),
        spg_consistency=_fraction(sum(groups[i] == declared[i] for i in with_group), len(with_group)),
        crystal_system_hit_rate=_fraction(sum(systems[i] == target_systems[i] for i in with_system), len(with_system)),
        density_wdist_g_cm3=density_wdist,
        n_elements_wdist=n_elements_wdist,
        energy=energy_summary,
        properties=properties,
        parse_errors=dict(Counter(e for e in errors if e is not None)),
        histograms=histograms,
        reference_histograms=reference_histograms,
        settings={
            "min_distance_a": min_distance,
            "min_volume_a3": MIN_VOLUME_A3,
            "symprec_a": symprec,
            "oxidation_states_set": oxidation_states_set,
            "matcher": {"ltol": matcher.ltol, "stol": matcher.stol, "angle_tol": matcher.angle_tol},
            "n_reference": len(reference_structures) if reference is not None else None,
            "stability_threshold_ev": STABILITY_THRESHOLD_EV,
        },
        timings_s=timings,
        records=records,
    )


def _compositional_validities(compositions: Mapping[int, Composition], oxidation_states_set: str) -> dict[int, bool]:
    """SMACT validity per index, each distinct composition checked once."""
    by_formula: dict[str, bool] = {}
    for composition in compositions.values():
        formula = composition.element_composition.formula
        if formula not in by_formula:
            by_formula[formula] = is_compositionally_valid(composition, oxidation_states_set)
    return {i: by_formula[c.element_composition.formula] for i, c in compositions.items()}


def _remap(local: Sequence[int | None], indices: Sequence[int]) -> list[int | None]:
    return [None if j is None else indices[j] for j in local]


def _reference_statistics(
    valid_structures: Sequence[Structure], reference: Sequence[Structure], symprec: float, progress: ProgressFn
) -> tuple[dict[str, dict[str, int]], float | None, float | None]:
    """Reference histograms and Wasserstein distances of density (g/cm³) and of the number of elements."""
    groups = [
        spacegroup_number(s, symprec) for s in progress(reference, desc="reference symmetry", total=len(reference))
    ]
    density = _wasserstein([s.density for s in valid_structures], [s.density for s in reference])
    n_elements = _wasserstein([len(s.composition) for s in valid_structures], [len(s.composition) for s in reference])
    return _histograms(reference, groups), density, n_elements


def _histograms(structures: Sequence[Structure], groups: Sequence[int | None]) -> dict[str, dict[str, int]]:
    return {
        "element": element_histogram(structures),
        "spacegroup": _ordered_histogram(groups, range(1, 231)),
        "crystal_system": _ordered_histogram(
            (None if g is None else crystal_system(g) for g in groups), CRYSTAL_SYSTEMS
        ),
    }


def _property_metrics(
    valid_structures: Sequence[Structure],
    valid: Sequence[int],
    targets: Mapping[str, Any],
    predictors: Mapping[str, PropertyPredictor],
    n: int,
) -> tuple[dict[str, dict[int, float]], dict[str, list[float | None]], dict[str, dict[str, float | int | None]]]:
    names = [k for k in targets if k not in (SPACEGROUP_KEY, CRYSTAL_SYSTEM_KEY)]
    predicted: dict[str, dict[int, float]] = {}
    per_target: dict[str, list[float | None]] = {}
    metrics: dict[str, dict[str, float | int | None]] = {}
    for name in names:
        per_target[name] = [None if v is None else float(v) for v in _per_structure(targets[name], n, name)]
        if name not in predictors:
            logger.warning("property target %r has no predictor; it is not judged", name)
            continue
        values = np.asarray(predictors[name](valid_structures), dtype=float) if valid_structures else np.zeros(0)
        predicted[name] = dict(zip(valid, values.tolist(), strict=True))
        pairs = np.array([(predicted[name][i], per_target[name][i]) for i in valid if per_target[name][i] is not None])
        pairs = pairs[np.isfinite(pairs).all(axis=1)] if len(pairs) else np.zeros((0, 2))
        deviation = np.abs(pairs[:, 0] - pairs[:, 1])
        metrics[name] = {
            "n": len(pairs),
            "mean_abs_deviation": float(deviation.mean()) if len(pairs) else None,
            "median_predicted": float(np.median(pairs[:, 0])) if len(pairs) else None,
            "median_target": float(np.median(pairs[:, 1])) if len(pairs) else None,
        }
    return predicted, per_target, metrics


def _energy_metrics(
    valid_structures: Sequence[Structure],
    valid: Sequence[int],
    reference: Sequence[Structure],
    energy_model: EnergyModel | None,
    duplicates: Mapping[int, int | None],
    novel: Mapping[int, bool],
    reference_formation_energies: np.ndarray | None,
) -> tuple[dict[int, float], dict[int, float], dict[str, float | int | None] | None]:
    """Energies (eV/atom), energies above the reference hull (eV/atom) and their summary, by index."""
    if energy_model is None or not valid_structures:
        return {}, {}, None
    energies = np.asarray(energy_model(valid_structures), dtype=float)
    hull = np.full(len(valid), np.nan)
    elemental, fit_rms = {}, None
    if reference:
        reference_energies = _reference_energies_in_systems(valid_structures, reference, energy_model)
        if reference_formation_energies is not None:
            elemental, fit_rms = fit_elemental_energies(reference, reference_energies, reference_formation_energies)
        hull = energies_above_hull(valid_structures, energies, reference, reference_energies, elemental)
    covered = np.isfinite(hull)
    stable = covered & (hull <= STABILITY_THRESHOLD_EV)
    sun = [bool(stable[k]) and duplicates[i] is None and novel.get(i, False) for k, i in enumerate(valid)]
    summary: dict[str, float | int | None] = {
        "mean_energy_per_atom_ev": float(np.nanmean(energies)) if np.isfinite(energies).any() else None,
        "n_energy": int(np.isfinite(energies).sum()),
        "n_hull": int(covered.sum()),
        "median_e_above_hull_ev": float(np.median(hull[covered])) if covered.any() else None,
        "stable_fraction": _fraction(int(stable.sum()), int(covered.sum())),
        "sun_rate": _fraction(sum(sun), int(covered.sum())) if reference else None,
        "n_fitted_elemental_energies": len(elemental),
        "elemental_fit_rms_ev": fit_rms,
    }
    energy_by_index = {i: float(e) for i, e in zip(valid, energies, strict=True) if np.isfinite(e)}
    hull_by_index = {i: float(h) for i, h in zip(valid, hull, strict=True) if np.isfinite(h)}
    return energy_by_index, hull_by_index, summary


# ----------------------------------------------------------------------------------------------------
# Writing


def write_report(report: EvaluationReport, out_dir: str | Path) -> list[Path]:
    """Write ``metrics.json``, ``per_structure.json``, PNG histograms/density maps and ``summary.md``; return paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "per_structure.json"]
    written[0].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    written[1].write_text(json.dumps(report.to_dict(include_records=True)["records"], indent=1) + "\n")
    figures: list[tuple[str, Path]] = []
    for kind, label in (("element", "element"), ("spacegroup", "space group"), ("crystal_system", "crystal system")):
        path = out / f"hist_{kind}.png"
        _plot_histogram(plt, report.histograms[kind], (report.reference_histograms or {}).get(kind), label, path)
        figures.append((f"{label} histogram", path))
    for name, path in _plot_properties(plt, report, out):
        figures.append((name, path))
    summary = out / "summary.md"
    summary.write_text(_markdown(report, figures))
    return written + [p for _, p in figures] + [summary]


def _plot_histogram(
    plt: Any, counts: Mapping[str, int], reference: Mapping[str, int] | None, label: str, path: Path
) -> None:
    """Bar chart of shares, generated beside reference when given."""
    keys = list(counts) if reference is None else _merged_keys(counts, reference)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(keys) + 2), 3.5))
    total = max(1, sum(counts.values()))
    width = 0.4 if reference else 0.8
    ax.bar(x - (width / 2 if reference else 0), [counts.get(k, 0) / total for k in keys], width, label="generated")
    if reference:
        ref_total = max(1, sum(reference.values()))
        ax.bar(x + width / 2, [reference.get(k, 0) / ref_total for k in keys], width, label="reference")
        ax.legend()
    ax.set_xticks(x, keys, rotation=90, fontsize=6 if len(keys) > 30 else 8)
    ax.set_xlabel(label)
    ax.set_ylabel("share of all counts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merged_keys(a: Mapping[str, int], b: Mapping[str, int]) -> list[str]:
    keys = set(a) | set(b)
    if all(k.isdigit() for k in keys):
        return sorted(keys, key=int)
    if keys <= set(CRYSTAL_SYSTEMS):
        return [k for k in CRYSTAL_SYSTEMS if k in keys]
    return sorted(keys, key=lambda sym: Element(sym).Z)


def _plot_properties(plt: Any, report: EvaluationReport, out: Path) -> list[tuple[str, Path]]:
    """Density maps of predicted vs target per property, and the joint map of the first two properties."""
    names = list(report.properties)
    figures = []
    for name in names:
        pairs = np.array(
            [(r.target[name], r.predicted[name]) for r in report.records if name in r.predicted and name in r.target]
        )
        pairs = pairs[np.isfinite(pairs).all(axis=1)] if len(pairs) else pairs
        if not len(pairs):
            continue
        path = out / f"density_{name}.png"
        fig, ax = plt.subplots(figsize=(4.5, 4))
        if np.ptp(pairs[:, 0]) > 0:
            *_, image = ax.hist2d(pairs[:, 0], pairs[:, 1], bins=40, cmap="viridis", cmin=1)
            fig.colorbar(image, ax=ax, label="structures")
            lo, hi = float(pairs.min()), float(pairs.max())
            ax.plot([lo, hi], [lo, hi], "r--", lw=1)
            ax.set_xlabel(f"target {name}")
            ax.set_ylabel(f"predicted {name}")
        else:
            ax.hist(pairs[:, 1], bins=40)
            ax.axvline(pairs[0, 0], color="r", ls="--", label="target")
            ax.set_xlabel(f"predicted {name}")
            ax.set_ylabel("structures")
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        figures.append((f"{name}: predicted vs target", path))
    if len(names) >= 2:
        a, b = names[:2]
        rows = [r for r in report.records if a in r.predicted and b in r.predicted]
        if rows:
            path = out / f"density_{a}_vs_{b}.png"
            fig, ax = plt.subplots(figsize=(4.5, 4))
            *_, image = ax.hist2d(
                [r.predicted[a] for r in rows], [r.predicted[b] for r in rows], bins=40, cmap="viridis", cmin=1
            )
            fig.colorbar(image, ax=ax, label="structures")
            target_points = {(r.target[a], r.target[b]) for r in rows if a in r.target and b in r.target}
            if len(target_points) <= _MAX_TARGET_MARKERS:  # a few conditioning targets, as in SLICES-PLUS Fig. 4/5
                for ta, tb in target_points:
                    ax.plot(ta, tb, "r*", ms=12)
            ax.set_xlabel(f"predicted {a}")
            ax.set_ylabel(f"predicted {b}")
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
            figures.append((f"joint density of {a} and {b} (targets as stars)", path))
    return figures


def _markdown(report: EvaluationReport, figures: Sequence[tuple[str, Path]]) -> str:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = [
        ("structures", report.n),
        ("parsed", report.n_parsed),
        ("valid samples (structurally and compositionally valid)", report.n_valid_samples),
        ("structural validity", report.structural_validity),
        ("compositional validity (SMACT)", report.compositional_validity),
        ("validity (both)", report.validity),
        ("uniqueness", report.uniqueness),
        ("novelty", report.novelty),
        ("unique and novel", report.unique_novel),
        ("space-group consistency", report.spg_consistency),
        ("crystal-system hit rate", report.crystal_system_hit_rate),
        ("density Wasserstein distance (g/cm³)", report.density_wdist_g_cm3),
        ("number-of-elements Wasserstein distance", report.n_elements_wdist),
    ]
    rows += [(f"energy: {k}", v) for k, v in (report.energy or {}).items()]
    rows += [(f"{name}: {k}", v) for name, m in report.properties.items() for k, v in m.items()]
    lines = ["# Evaluation of generated crystals", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in rows]
    if report.parse_errors:
        lines += ["", "Unparsable inputs: " + ", ".join(f"{k} × {v}" for k, v in report.parse_errors.items())]
    settings = report.settings
    lines += [
        "",
        f"Settings: distance cut-off {settings['min_distance_a']} Å, spglib symprec {settings['symprec_a']} Å, "
        f"SMACT oxidation states {settings['oxidation_states_set']}, StructureMatcher {settings['matcher']}.",
        "Uniqueness, novelty and symmetry metrics are fractions of the valid samples; "
        "validities are fractions of all inputs.",
        "",
    ]
    for caption, path in figures:
        lines += [f"![{caption}]({path.name})", ""]
    return "\n".join(lines)
