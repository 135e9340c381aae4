"""Optional relaxation of decoded crystals with an ML interatomic potential (CHGNet 0.3.0, the ``mlip`` extra).

The SLICES decoder of ``crystal_tokenizers`` builds geometry from the bonded net alone; a relaxation with
CHGNet (Deng et al., Nat. Mach. Intell. 5, 1031 (2023)) then moves cell and atoms toward the potential's
minimum, as the published SLICES decoder does with M3GNet. It is an extra, never a requirement:
``pip install 'crystal-lm[mlip]'`` (the weights ship inside the chgnet wheel, so it works offline).

``graph_preserving_relaxer`` keeps a relaxed crystal only while it still has the string's crystal graph
(the SLICES validity criterion): the final frame when it holds the graph, else the latest frame of the
relaxation's trajectory found (by bisection) to hold it, else the unrelaxed decode.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from pymatgen.core import Lattice, Structure

logger = logging.getLogger(__name__)

RELAX_FMAX = 0.1
"""Force convergence threshold of the relaxation (eV/Å)."""
RELAX_STEPS = 200
"""Most FIRE steps per crystal."""


def chgnet_relaxer(
    fmax: float = RELAX_FMAX, steps: int = RELAX_STEPS, device: str = "cpu", trajectory: bool = False
) -> Callable[[Structure], Structure | list[Structure]]:
    """A function relaxing one crystal (cell and positions) with CHGNet: the relaxed crystal, or with
    ``trajectory`` every frame of the relaxation (first the input, last the relaxed one); raises
    ``ImportError`` without chgnet."""
    try:
        from chgnet.model import StructOptimizer
    except ImportError as err:
        raise ImportError("relaxation needs chgnet: pip install 'crystal-lm[mlip]'") from err
    with contextlib.redirect_stdout(io.StringIO()):
        optimizer = StructOptimizer(use_device=device)

    def relax(structure: Structure) -> Structure | list[Structure]:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            result = optimizer.relax(structure, fmax=fmax, steps=steps, relax_cell=True, verbose=False)
        if not trajectory:
            return result["final_structure"]
        frames = result["trajectory"]
        return [Structure(Lattice(cell), structure.species, positions, coords_are_cartesian=True)
                for cell, positions in zip(frames.cells, frames.atom_positions)] + [result["final_structure"]]

    return relax


def latest_holding_frame(frames: Sequence[Structure], holds: Callable[[Structure], bool]) -> int | None:
    """Index of the latest frame of ``frames`` that ``holds`` (the last one if it does; else by bisection between
    frame 0, taken as holding, and the last); ``None`` when no frame after the first was found to hold."""
    if holds(frames[-1]):
        return len(frames) - 1
    low, high = 0, len(frames) - 1  # low: holds (frame 0 by assumption), high: does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if holds(frames[middle]) else (low, middle)
    return low or None


def graph_preserving_relaxer(
    tokenizer: Any, relax: Callable[[Structure], Structure | Sequence[Structure]] | None = None
) -> Callable[[str, Structure], Structure]:
    """``(text, decoded) -> crystal``: the relaxed crystal if it keeps the graph of ``text``; else, when
    ``relax`` returns a trajectory, its latest frame found to keep the graph (:func:`latest_holding_frame`);
    else ``decoded``.

    ``tokenizer`` needs ``string_graph_matches`` (SlicesPlusTokenizer). ``relax`` returns a crystal or its
    frames (default: CHGNet with ``trajectory=True``). A relaxation that fails (CHGNet cannot build a graph
    for very sparse crystals) also returns ``decoded``.
    """
    relax = relax or chgnet_relaxer(trajectory=True)

    def refine(text: str, decoded: Structure) -> Structure:
        try:
            result = relax(decoded)
        except (ValueError, RuntimeError) as err:
            logger.info("relaxation failed (%s); keeping the unrelaxed decode", err)
            return decoded
        frames = [decoded, result] if isinstance(result, Structure) else list(result)
        index = latest_holding_frame(frames, lambda frame: tokenizer.string_graph_matches(text, frame))
        return decoded if index is None else frames[index]

    return refine
