"""Optional relaxation of decoded crystals with an ML interatomic potential (CHGNet 0.3.0, the ``mlip`` extra).

The SLICES decoder of ``crystal_tokenizers`` builds geometry from the bonded net alone; a relaxation with
CHGNet (Deng et al., Nat. Mach. Intell. 5, 1031 (2023)) then moves cell and atoms toward the potential's
minimum, as the published SLICES decoder does with M3GNet. It is an extra, never a requirement:
``pip install 'crystal-lm[mlip]'`` (the weights ship inside the chgnet wheel, so it works offline).

``graph_preserving_relaxer`` keeps a relaxed crystal only while it still has the string's crystal graph
(the SLICES validity criterion); otherwise the unrelaxed decode is returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

from pymatgen.core import Structure

logger = logging.getLogger(__name__)

RELAX_FMAX = 0.1
"""Force convergence threshold of the relaxation (eV/Å)."""
RELAX_STEPS = 200
"""Most FIRE steps per crystal."""


def chgnet_relaxer(
    fmax: float = RELAX_FMAX, steps: int = RELAX_STEPS, device: str = "cpu"
) -> Callable[[Structure], Structure]:
    """A function relaxing one crystal (cell and positions) with CHGNet; raises ``ImportError`` without it."""
    try:
        from chgnet.model import StructOptimizer
    except ImportError as err:
        raise ImportError("relaxation needs chgnet: pip install 'crystal-lm[mlip]'") from err
    with contextlib.redirect_stdout(io.StringIO()):
        optimizer = StructOptimizer(use_device=device)

    def relax(structure: Structure) -> Structure:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            result = optimizer.relax(structure, fmax=fmax, steps=steps, relax_cell=True, verbose=False)
        return result["final_structure"]

    return relax


def graph_preserving_relaxer(
    tokenizer: Any, relax: Callable[[Structure], Structure] | None = None
) -> Callable[[str, Structure], Structure]:
    """``(text, decoded) -> crystal``: the relaxed crystal if it keeps the graph of ``text``, else ``decoded``.

    ``tokenizer`` needs ``string_graph_matches`` (SlicesPlusTokenizer). A relaxation that fails (CHGNet
    cannot build a graph for very sparse crystals) also returns ``decoded``.
    """
    relax = relax or chgnet_relaxer()

    def refine(text: str, decoded: Structure) -> Structure:
        try:
            relaxed = relax(decoded)
        except (ValueError, RuntimeError) as err:
            logger.info("relaxation failed (%s); keeping the unrelaxed decode", err)
            return decoded
        return relaxed if tokenizer.string_graph_matches(text, relaxed) else decoded

    return refine
