"""SLICES / SLICES-PLUS: crystal graphs as text, and our own graph -> crystal decoder.

``graph`` (Structure <-> labelled quotient graph), ``codec`` (graph + symmetry operations <-> text),
``embedding`` (graph -> coordinates and cell: the retry control), built from ``placement`` (bond targets,
barycentric placement, first cell), ``objective`` (the placement objective and its minimiser),
``automorphisms`` (which rotations act on the net, and how) and ``primitive`` (the primitive net of a
centred cell); ``coordination`` (per-element degree limits and bonded pairs learned from training strings,
for the grammar), ``systems`` (the crystal system of a rotation group) and ``symmetrize`` (impose a written
point group on a decoded crystal: the symmetry-honouring mode). ``SlicesPlusTokenizer`` wraps them for
HuggingFace.
"""

from crystal_tokenizers.slices.codec import SlicesRecord, SymOp, format_record, parse_record, symmetry_operations
from crystal_tokenizers.slices.embedding import EmbeddingParams, embed, embed_checked
from crystal_tokenizers.slices.graph import (
    DEFAULT_STRATEGY,
    NEIGHBOUR_STRATEGIES,
    CrystalGraph,
    graphs_match,
    structure_to_graph,
)

__all__ = [
    "DEFAULT_STRATEGY",
    "NEIGHBOUR_STRATEGIES",
    "CrystalGraph",
    "EmbeddingParams",
    "SlicesRecord",
    "SymOp",
    "embed",
    "embed_checked",
    "format_record",
    "graphs_match",
    "parse_record",
    "structure_to_graph",
    "symmetry_operations",
]
