"""Crystal tokenizers: invertible token representations of crystal structures."""

from crystal_tokenizers.errors import (
    CompositionMismatchError,
    CrystalDecodeError,
    CrystalEncodeError,
    CrystalError,
    DecodeTimeoutError,
    DisorderedStructureError,
    EmbeddingError,
    GraphConstructionError,
    InvalidLatticeError,
    InvalidStructureError,
    InvalidWyckoffError,
    MalformedSequenceError,
    SymmetryAnalysisError,
    SymmetryMismatchError,
    UnsupportedElementError,
)
from crystal_tokenizers.protocol import CrystalTokenizer, GraphCrystalTokenizer, PromptCrystalTokenizer
from crystal_tokenizers.slices.grammar import SlicesGrammarLogitsProcessor
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer
from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from crystal_tokenizers.wyckoff.grammar import WyckoffGrammarLogitsProcessor
from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS, crystal_system, structure_crystal_system

__all__ = [
    "CRYSTAL_SYSTEMS",
    "CompositionMismatchError",
    "CrystalDecodeError",
    "CrystalEncodeError",
    "CrystalError",
    "CrystalTokenizer",
    "DecodeTimeoutError",
    "DisorderedStructureError",
    "EmbeddingError",
    "GraphCrystalTokenizer",
    "GraphConstructionError",
    "InvalidLatticeError",
    "InvalidStructureError",
    "InvalidWyckoffError",
    "MalformedSequenceError",
    "PromptCrystalTokenizer",
    "SlicesGrammarLogitsProcessor",
    "SlicesPlusTokenizer",
    "SymmetryAnalysisError",
    "SymmetryMismatchError",
    "UnsupportedElementError",
    "WyckoffGrammarLogitsProcessor",
    "WyckoffTokenizer",
    "crystal_system",
    "structure_crystal_system",
]
