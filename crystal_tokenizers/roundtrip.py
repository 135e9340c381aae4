"""Round-trip checks: structure -> string -> structure, compared with pymatgen's StructureMatcher."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError


def default_matcher() -> StructureMatcher:
    """StructureMatcher at pymatgen's default tolerances (ltol 0.2, stol 0.3, angle_tol 5°).

    ``attempt_supercell=True`` because a decoded crystal is the conventional standard cell, which can
    hold more (centred groups) or fewer (an input supercell) atoms than the input cell.
    """
    return StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5, attempt_supercell=True)


def _elements_only(structure: Structure) -> Structure:
    """``structure`` without oxidation states (the token languages write elements only), copied if it had any."""
    if all(getattr(species, "oxi_state", None) is None for species in structure.species):
        return structure
    plain = structure.copy()
    plain.remove_oxidation_states()
    return plain


@dataclass
class RoundTripReport:
    """Counts, rates (0–1) and speeds (structures/s) of one round trip over a set of structures."""

    n: int
    encoded: int
    decoded: int
    matched: int
    match_rate: float
    errors: dict[str, int]
    encode_per_s: float
    decode_per_s: float
    graph_matched: int | None = None
    graph_match_rate: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_failures: bool = False) -> dict[str, Any]:
        """JSON-ready dict (graph keys only when measured, failures only on request)."""
        data = asdict(self)
        if not with_failures:
            data.pop("failures")
        if self.graph_matched is None:
            data.pop("graph_matched")
            data.pop("graph_match_rate")
        return data


def round_trip(
    tokenizer: Any,
    structures: Sequence[Structure],
    ids: Sequence[str] | None = None,
    matcher: StructureMatcher | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
    refine: Callable[[str, Structure], Structure] | None = None,
) -> RoundTripReport:
    """Encode and decode every structure with ``tokenizer`` and compare with ``matcher``.

    Works with any tokenizer that has ``structure_to_string`` and ``string_to_structure``; when it also
    has ``graph_matches(original, decoded)`` (SLICES), the graph match rate is reported too.
    ``refine(text, decoded)`` post-processes every decoded crystal (e.g. an ML-potential relaxation) and
    counts toward the decode time. Species are compared as elements: oxidation states are not encoded.
    """
    matcher = matcher or default_matcher()
    ids = list(ids) if ids is not None else [str(i) for i in range(len(structures))]
    has_graph = hasattr(tokenizer, "graph_matches")
    errors: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    texts: list[str | None] = []
    start = time.perf_counter()
    for structure in progress(structures):
        try:
            texts.append(tokenizer.structure_to_string(structure))
        except CrystalEncodeError as err:
            texts.append(None)
            errors[type(err).__name__] += 1
            failures.append({"id": None, "stage": "encode", "error": type(err).__name__, "message": str(err)})
    encode_seconds = time.perf_counter() - start
    for failure, index in zip(failures, [i for i, t in enumerate(texts) if t is None]):
        failure["id"] = ids[index]

    decoded: list[Structure | None] = []
    start = time.perf_counter()
    for index, text in enumerate(progress(texts)):
        if text is None:
            decoded.append(None)
            continue
        try:
            result = tokenizer.string_to_structure(text)
            decoded.append(refine(text, result) if refine is not None else result)
        except CrystalDecodeError as err:
            decoded.append(None)
            errors[type(err).__name__] += 1
            failures.append({"id": ids[index], "stage": "decode", "error": type(err).__name__, "message": str(err)})
    decode_seconds = time.perf_counter() - start

    matched = graph_matched = 0
    for index, (original, result) in enumerate(zip(structures, decoded)):
        if result is None:
            continue
        original = _elements_only(original)
        if matcher.fit(original, result):
            matched += 1
        else:
            failures.append({"id": ids[index], "stage": "match", "error": "NoMatch", "message": texts[index]})
        if has_graph and tokenizer.graph_matches(original, result):
            graph_matched += 1
    n = len(structures)
    encoded = sum(text is not None for text in texts)
    n_decoded = sum(result is not None for result in decoded)
    return RoundTripReport(
        n=n,
        encoded=encoded,
        decoded=n_decoded,
        matched=matched,
        match_rate=matched / n if n else 0.0,
        errors=dict(errors),
        encode_per_s=n / encode_seconds if encode_seconds > 0 else float("inf"),
        decode_per_s=encoded / decode_seconds if decode_seconds > 0 else float("inf"),
        graph_matched=graph_matched if has_graph else None,
        graph_match_rate=(graph_matched / n if n else 0.0) if has_graph else None,
        failures=failures,
    )
