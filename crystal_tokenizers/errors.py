"""Typed errors of crystal-lm: one family for encoding, one for decoding.

Batch APIs never raise these for a single bad item; they return the error object in the item's
place so that callers can count failures by type (``type(err).__name__``).
"""

from __future__ import annotations


class CrystalError(ValueError):
    """Base class of every crystal-lm encoding or decoding error."""


class CrystalEncodeError(CrystalError):
    """A structure cannot be turned into a token string."""


class DisorderedStructureError(CrystalEncodeError):
    """The structure has partial occupancies or mixed species on a site."""


class InvalidStructureError(CrystalEncodeError):
    """The structure is empty, has no lattice, or has non-finite coordinates or lattice values."""


class SymmetryAnalysisError(CrystalEncodeError):
    """spglib could not find a space group, or the result cannot be expressed in the vocabulary."""


class UnsupportedElementError(CrystalEncodeError):
    """A species is not in the tokenizer's vocabulary (e.g. a dummy species or a vacancy)."""


class GraphConstructionError(CrystalEncodeError):
    """The crystal graph cannot be built (e.g. an isolated atom under the neighbour strategy)."""


class CrystalDecodeError(CrystalError):
    """A token string cannot be turned into a crystal."""


class MalformedSequenceError(CrystalDecodeError):
    """The token string does not follow the grammar (missing parts, wrong order, unknown tokens)."""


class InvalidWyckoffError(CrystalDecodeError):
    """An orbit is not a Wyckoff position of the space group, or a fixed orbit is used twice."""


class InvalidLatticeError(CrystalDecodeError):
    """Lattice parameters are missing, non-finite, non-positive, or do not form a valid cell."""


class CompositionMismatchError(CrystalDecodeError):
    """Site multiplicities disagree with a declared composition."""


class EmbeddingError(CrystalDecodeError):
    """A crystal graph could not be embedded in 3-D (e.g. not 3-periodic) or did not converge."""


class SymmetryMismatchError(CrystalDecodeError):
    """Decoded symmetry operations are inconsistent with the decoded crystal graph."""


class DecodeTimeoutError(CrystalDecodeError):
    """Decoding took longer than its time box."""
