"""Corruption of Wyckoff token sequences for masked reconstruction (Liu et al., arXiv:2312.14485).

A crystal is damaged in two ways, and only the damaged positions carry reconstruction labels:

- **Species masking.** Element tokens of the body (one per occupied orbit) are replaced by ``<mask>``:
  either every orbit of one randomly chosen species ("species" strategy), or each orbit independently
  with probability ``mask_fraction`` (15 % in training, 30 % for evaluation; at least one orbit). The
  strategy itself is drawn at random (``species_probability``). The paper masks atoms; in this format
  an orbit (all symmetry-equivalent atoms of one element) is the unit, so fractions count orbits.
- **Position noise.** The paper displaces every atom by Gaussian noise of σ = σ̃ × the shortest lattice
  edge (Å). A free coordinate value here is fractional along one axis (``x`` -> a, ``y`` -> b,
  ``z`` -> c), so its noise is σ̃ × min(a, b, c) / L_axis in fractional units; noisy values are wrapped
  to [0, 1). Lattice values and condition values are never changed.

Everything here is a pure function of the token strings (``<num>`` at every value position, as the
tokenizer's ``convert_ids_to_tokens`` gives them) and a float array of values (NaN elsewhere), plus an
explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from crystal_tokenizers.wyckoff.codec import ELEMENTS, LAT, NUM
from crystal_tokenizers.crystal_systems import crystal_system
from crystal_tokenizers.wyckoff.orbits import FREE_PARAMETER_NAMES, LATTICE_PARAMETERS

MASK = "<mask>"
DEFAULT_MASK_FRACTION = 0.15
"""Fraction of orbits masked by the random strategy in training (Liu et al.: 15 % of atoms)."""
EVAL_MASK_FRACTION = 0.3
"""Fraction of orbits masked by the evaluation's random mask type γ (Liu et al.: 30 % of atoms)."""
_ELEMENT_SET = frozenset(ELEMENTS)
_AXIS_OF_LABEL = {name: axis for axis, name in enumerate(FREE_PARAMETER_NAMES)}


@dataclass(frozen=True)
class MaskingSpec:
    """How to damage a crystal: the masking strategy mix, the random fraction and the noise level σ̃."""

    species_probability: float = 0.5
    """Probability of the "all orbits of one species" strategy (else the random-fraction strategy)."""
    mask_fraction: float = DEFAULT_MASK_FRACTION
    noise_scale: float = 0.1
    """σ̃: coordinate noise standard deviation as a fraction of the shortest lattice edge."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.species_probability <= 1.0:
            raise ValueError(f"species_probability must lie in [0, 1], got {self.species_probability}")
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ValueError(f"mask_fraction must lie in (0, 1], got {self.mask_fraction}")
        if self.noise_scale < 0.0:
            raise ValueError(f"noise_scale must be non-negative, got {self.noise_scale}")


@dataclass(frozen=True)
class Corruption:
    """A damaged sequence: tokens and values, and which positions carry reconstruction labels."""

    tokens: tuple[str, ...]
    values: np.ndarray
    """(T,) float values after noise (NaN at non-value positions)."""
    masked_positions: tuple[int, ...]
    """Token indices of the masked element tokens (label: the original element)."""
    noised_positions: tuple[int, ...]
    """Token indices of the noised coordinate values (label: the original value)."""


def body_start(tokens: Sequence[str]) -> int:
    """Index of the first body token (after ``<sep>`` when there is a condition prefix)."""
    return tokens.index("<sep>") + 1 if "<sep>" in tokens else 0


def element_positions(tokens: Sequence[str]) -> list[int]:
    """Indices of the body's orbit element tokens (an element followed by a ``wp:`` token), masked ones too."""
    start = body_start(tokens)
    return [
        i for i in range(start, len(tokens) - 1)
        if (tokens[i] in _ELEMENT_SET or tokens[i] == MASK) and tokens[i + 1].startswith("wp:")
    ]


def coordinate_value_positions(tokens: Sequence[str]) -> list[int]:
    """Indices of the ``<num>`` tokens that hold free fractional coordinates (after ``<lat>``)."""
    if LAT not in tokens:
        return []
    start = tokens.index(LAT)
    return [i for i in range(start + 1, len(tokens)) if tokens[i] == NUM and tokens[i - 1] in _AXIS_OF_LABEL]


def lattice_lengths(tokens: Sequence[str], values: np.ndarray) -> np.ndarray:
    """Cell edge lengths (a, b, c) in Å from the body's space group and free lattice values."""
    start = body_start(tokens)
    space_group = int(tokens[start].split(":")[1])
    lat = tokens.index(LAT)
    given: dict[str, float] = {}
    for name in LATTICE_PARAMETERS[crystal_system(space_group)]:
        index = tokens.index(name, lat)
        given[name] = float(values[index + 1])
    a = given["a"]
    return np.array([a, given.get("b", a), given.get("c", a)], dtype=float)


def fractional_noise_scales(tokens: Sequence[str], values: np.ndarray, noise_scale: float) -> np.ndarray:
    """Per-axis standard deviation (fractional) of σ̃ × min(a, b, c): σ̃ × min(a, b, c) / (a, b, c)."""
    lengths = lattice_lengths(tokens, values)
    return noise_scale * lengths.min() / lengths


def choose_masked_orbits(
    elements: Sequence[str], spec: MaskingSpec, rng: np.random.Generator
) -> list[int]:
    """Orbit indices to mask: all orbits of one random species, or a random fraction (at least one)."""
    if not elements:
        return []
    if rng.random() < spec.species_probability:
        species = sorted(set(elements))[int(rng.integers(len(set(elements))))]
        return [i for i, element in enumerate(elements) if element == species]
    return random_orbits(len(elements), spec.mask_fraction, rng)


def random_orbits(num_orbits: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """Each orbit independently with probability ``fraction``; one random orbit if none was drawn."""
    chosen = np.flatnonzero(rng.random(num_orbits) < fraction)
    if len(chosen) == 0:
        chosen = np.array([int(rng.integers(num_orbits))])
    return sorted(int(i) for i in chosen)


def corrupt(
    tokens: Sequence[str],
    values: np.ndarray,
    rng: np.random.Generator,
    *,
    masked_orbits: Sequence[int],
    noise_scale: float,
) -> Corruption:
    """Mask the element tokens of ``masked_orbits`` (orbit order) and noise every free coordinate by σ̃."""
    tokens = list(tokens)
    values = np.asarray(values, dtype=float).copy()
    sites = element_positions(tokens)
    if any(not 0 <= i < len(sites) for i in masked_orbits):
        raise IndexError(f"orbit indices {list(masked_orbits)} out of range for {len(sites)} orbits")
    masked = sorted(sites[i] for i in set(masked_orbits))
    for position in masked:
        tokens[position] = MASK
    noised: list[int] = []
    if noise_scale > 0:
        noised = coordinate_value_positions(tokens)
        if noised:
            scales = fractional_noise_scales(tokens, values, noise_scale)
            axes = np.array([_AXIS_OF_LABEL[tokens[i - 1]] for i in noised])
            noisy = values[noised] + rng.normal(size=len(noised)) * scales[axes]
            values[noised] = np.mod(noisy, 1.0)
    return Corruption(tuple(tokens), values, tuple(masked), tuple(noised))


def corrupt_random(tokens: Sequence[str], values: np.ndarray, spec: MaskingSpec, rng: np.random.Generator) -> Corruption:
    """The training corruption: a random strategy (species or fraction) and noise of σ̃ = ``spec.noise_scale``."""
    elements = [tokens[i] for i in element_positions(tokens)]
    return corrupt(tokens, values, rng, masked_orbits=choose_masked_orbits(elements, spec, rng), noise_scale=spec.noise_scale)


def orbits_of_species(tokens: Sequence[str], species: str) -> list[int]:
    """Orbit indices occupied by ``species``."""
    return [k for k, i in enumerate(element_positions(tokens)) if tokens[i] == species]


__all__ = [
    "Corruption",
    "DEFAULT_MASK_FRACTION",
    "EVAL_MASK_FRACTION",
    "MASK",
    "MaskingSpec",
    "body_start",
    "choose_masked_orbits",
    "coordinate_value_positions",
    "corrupt",
    "corrupt_random",
    "element_positions",
    "fractional_noise_scales",
    "lattice_lengths",
    "orbits_of_species",
    "random_orbits",
]
