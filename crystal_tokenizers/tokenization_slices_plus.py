"""SlicesPlusTokenizer: the HuggingFace tokenizer for SLICES / SLICES-PLUS crystal-graph strings.

A string is the crystal's labelled quotient graph (node elements, then edges ``i j a b c`` with
periodic-image labels ``-``/``o``/``+``) followed, for SLICES-PLUS, by one six-token group per
symmetry operation (Xiao et al., Nat. Commun. 14, 7027 (2023); Wang et al., SLICES-PLUS). The
grammar and letter tables are in ``crystal_tokenizers.slices.codec``; decoding is our own periodic-net
embedding (``crystal_tokenizers.slices.embedding``), no TensorFlow or ML potential.

Vocabulary (fixed, no files needed): specials, elements H-Lr, node indices ``0 .. max_nodes-1``
(default 64: the published SLICES-PLUS sets have at most 40 nodes, MP-20 at most 20), edge labels,
the 26 rotation-row letters (``o1`` for [-1,-1,0]) and the 13 translation codes ``1s`` .. ``13s``.

Neighbour strategy: the default, ``minimumdistancenn_adaptive`` (MinimumDistanceNN at the smallest
tolerance giving a connected 3-periodic net), was chosen by round-trip success on MP-20 sample crystals
(see ``DEFAULT_TOKENIZER_STRATEGY`` for the measured numbers).

The package is imported absolutely so that a saved folder loads with ``trust_remote_code=True``
wherever crystal-lm is installed (CONVENTIONS.md, "Remote code").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from pymatgen.core import Structure

from crystal_tokenizers.base import SPECIAL_TOKENS, CrystalTokenizerBase, decode_or_error, to_list
from crystal_tokenizers.errors import (
    CrystalDecodeError,
    CrystalEncodeError,
    GraphConstructionError,
    MalformedSequenceError,
    UnsupportedElementError,
)
from crystal_tokenizers.slices.codec import (
    ELEMENT_SYMBOLS,
    ENCODE_ANGLE_TOLERANCE,
    ENCODE_SYMPREC,
    OFFSET_LABELS,
    ROTATION_ROWS,
    TRANSLATION_CODES,
    SlicesRecord,
    SymOp,
    format_record,
    parse_record,
    split_joined_labels,
    symmetry_operations,
)
from crystal_tokenizers.slices.coordination import (
    COORDINATION_FILE,
    DEFAULT_QUANTILE,
    DEFAULT_VOLUME_QUANTILE,
    CoordinationTable,
    learn_coordination,
)
from crystal_tokenizers.slices.embedding import EmbeddingParams, RETRY_VARIANTS, embed_checked, min_separation
from crystal_tokenizers.slices.graph import (
    DEFAULT_STRATEGY,
    CrystalGraph,
    augment_order,
    canonical_order,
    check_sliceable,
    graphs_match,
    make_strategy,
    structure_to_graph,
)
from crystal_tokenizers.slices.symmetrize import closed_rotations, impose_point_group

DEFAULT_MAX_NODES = 64
MIN_IMPOSED_SEPARATION = 0.5
"""Å: an imposed point group that brings two atoms closer than this is not kept (the decoder's own bound)."""
DEFAULT_TOKENIZER_STRATEGY = DEFAULT_STRATEGY
"""Default neighbour strategy, chosen by round trips (SLICES-PLUS) of ``../shared/data/mp20_sample/train.csv``.

Rows 140-219, an earlier version of this decoder, graph match / StructureMatcher match: minimumdistancenn
0.875 / 0.788, econnn 0.825 / 0.800, brunnernn_reciprocal 0.838 / 0.800, crystalnn 0.562 / 0.762. Rows
0-249, this decoder: minimumdistancenn 0.916 / 0.796 (0.752 both), minimumdistancenn_adaptive
0.896 / 0.820 (0.768 both). The adaptive strategy matches the most crystals on both criteria at once,
and every graph it writes is a connected 3-periodic net."""


def build_vocabulary(max_nodes: int = DEFAULT_MAX_NODES) -> list[str]:
    """The fixed token list, in id order."""
    tokens = list(SPECIAL_TOKENS) + list(ELEMENT_SYMBOLS)
    tokens += [str(k) for k in range(max_nodes)]
    tokens += list(OFFSET_LABELS)
    tokens += list(ROTATION_ROWS)
    tokens += list(TRANSLATION_CODES)
    return tokens


class SlicesPlusTokenizer(CrystalTokenizerBase):
    """Tokenizer for crystals as SLICES-PLUS strings (``symmetry=False``: plain SLICES).

    ``SlicesPlusTokenizer()`` needs no files. ``structure_to_string`` / ``string_to_structure`` convert
    between pymatgen ``Structure`` and text; ``decode_structures`` turns ``model.generate`` output into
    one ``Structure`` or ``CrystalDecodeError`` per sequence; ``graph_matches`` is the SLICES success
    criterion (the decoded crystal has the same labelled quotient graph).
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names = {**CrystalTokenizerBase.vocab_files_names, "coordination_file": COORDINATION_FILE}

    def __init__(
        self,
        vocab_file: str | None = None,
        coordination_file: str | None = None,
        symmetry: bool = True,
        strategy: str = DEFAULT_TOKENIZER_STRATEGY,
        max_nodes: int = DEFAULT_MAX_NODES,
        symprec: float = ENCODE_SYMPREC,
        angle_tolerance: float = ENCODE_ANGLE_TOLERANCE,
        decode_time_limit_s: float = EmbeddingParams.time_limit_s,
        decode_attempts: int = len(RETRY_VARIANTS),
        decode_lenient: bool = False,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        mask_token: str = "<mask>",
        **kwargs: Any,
    ) -> None:
        make_strategy(strategy)  # fail early on an unknown name
        self._set_vocabulary(self._read_vocabulary(vocab_file) if vocab_file else build_vocabulary(max_nodes))
        self.symmetry = symmetry
        self.strategy = strategy
        self.max_nodes = max_nodes
        self.symprec = symprec
        self.angle_tolerance = angle_tolerance
        self.decode_time_limit_s = decode_time_limit_s
        self.decode_attempts = decode_attempts
        self.decode_lenient = decode_lenient
        self.coordination: CoordinationTable | None = (
            CoordinationTable.load(coordination_file) if coordination_file else None
        )
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
            mask_token=mask_token, symmetry=symmetry, strategy=strategy, max_nodes=max_nodes,
            symprec=symprec, angle_tolerance=angle_tolerance, decode_time_limit_s=decode_time_limit_s,
            decode_attempts=decode_attempts, decode_lenient=decode_lenient,
            **kwargs,
        )

    def fitted_records(self) -> dict[str, Any]:
        """The coordination table, saved as ``slices_coordination.json`` when the tokenizer has one."""
        return {COORDINATION_FILE: self.coordination}

    def fit_coordination(
        self, texts: Sequence[str], quantile: float = DEFAULT_QUANTILE, pairs: bool = True,
        volume_quantile: float | None = DEFAULT_VOLUME_QUANTILE,
    ) -> CoordinationTable:
        """Learn the coordination table (per-element degree limits, bonded element pairs, short-cycle volume
        bound: ``slices.coordination.learn_coordination``) from real ``texts``, keep it on the tokenizer
        (saved with it; used by ``grammar_processor``) and return it. Texts that do not parse are skipped."""
        graphs = []
        for text in texts:
            try:
                graphs.append(parse_record(text).graph)
            except CrystalDecodeError:
                continue
        self.coordination = learn_coordination(graphs, quantile, pairs, volume_quantile)
        return self.coordination

    def fit_training_statistics(self, texts: Sequence[str]) -> CoordinationTable:
        """The coordination table of the training ``texts`` at the default quantiles (:meth:`fit_coordination`)."""
        return self.fit_coordination(texts)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [piece for word in text.split() for piece in split_joined_labels(word)]

    # ------------------------------------------------------------------ crystals -> text
    def structure_to_graph(self, structure: Structure) -> CrystalGraph:
        """The crystal graph of ``structure`` in canonical node order (see ``slices.graph``)."""
        name = structure.composition.reduced_formula
        unknown = sorted({site.specie.symbol for site in structure if site.specie.symbol not in self._token_to_id})
        if unknown:
            raise UnsupportedElementError(f"{name}: species {unknown} are not in the vocabulary")
        if len(structure) > self.max_nodes:
            raise GraphConstructionError(f"{name}: {len(structure)} sites exceed max_nodes={self.max_nodes}")
        raw = structure_to_graph(structure, self.strategy)
        check_sliceable(raw, name)
        return raw.permuted(canonical_order(raw, structure.frac_coords))

    def structure_to_string(self, structure: Structure, augment: bool = False, seed: int | None = None) -> str:
        """Encode ``structure`` as SLICES(-PLUS) text in canonical node order.

        ``augment=True`` relabels the nodes at random (and shuffles the operations): an equivalent
        string for data augmentation (``seed`` makes it reproducible). Raises ``CrystalEncodeError``.
        """
        crystal_graph = self.structure_to_graph(structure)
        symops: tuple[SymOp, ...] = ()
        if self.symmetry:
            symops = symmetry_operations(structure, self.symprec, self.angle_tolerance)
        if augment:
            crystal_graph, _ = augment_order(crystal_graph, seed)
            shuffled = list(symops)
            random.Random(seed).shuffle(shuffled)
            symops = tuple(shuffled)
        return format_record(SlicesRecord(crystal_graph, symops))

    # ------------------------------------------------------------------ text -> crystals
    def string_to_record(self, text: str, lenient: bool | None = None) -> SlicesRecord:
        """Parse text into the graph and operations (no geometry built); ``MalformedSequenceError``
        naming the token and the reason. ``lenient`` (default: the tokenizer's ``decode_lenient``) repairs
        what can be repaired instead (``codec.parse_record``), listed in the record's ``repairs``."""
        record = parse_record(text, lenient=self.decode_lenient if lenient is None else lenient)
        if record.graph.num_nodes > self.max_nodes:
            raise MalformedSequenceError(f"{record.graph.num_nodes} nodes exceed max_nodes={self.max_nodes}")
        return record

    def string_to_structure(self, text: str, lenient: bool | None = None) -> Structure:
        """Decode text to a ``Structure`` whose sites follow the string's nodes; ``CrystalDecodeError``.

        ``lenient=True`` (default: the tokenizer's ``decode_lenient``) decodes a malformed string after
        the repairs of ``codec.parse_record`` (dangling or out-of-range edges and bad symmetry groups
        dropped, unbonded nodes removed, so sites then follow the kept nodes); the repairs are listed in
        ``structure.properties["slices_repairs"]`` (absent when none were needed), so that callers can
        count repaired decodes separately.
        """
        record = self.string_to_record(text, lenient)
        params = EmbeddingParams(time_limit_s=self.decode_time_limit_s)
        structure = embed_checked(record.graph, record.symops, self.strategy, params, self.decode_attempts)
        if record.repairs:
            structure.properties["slices_repairs"] = list(record.repairs)
        return structure

    def string_to_structure_in_group(self, text: str, lenient: bool | None = None) -> Structure:
        """``string_to_structure``, then the written point group imposed on the crystal (the ``"group"``
        symmetry mode, ``slices.symmetrize``): symmetrised metric and positions.

        The rotations written are closed into a group first. ``structure.properties["slices_group_imposed"]``
        says whether the projection was kept: it is not when it brings two atoms closer than
        ``MIN_IMPOSED_SEPARATION`` Å (the crystal as embedded is returned then).
        """
        record = self.string_to_record(text, lenient)
        structure = self.string_to_structure(text, lenient)
        group = closed_rotations(np.array([op.matrices()[0] for op in record.symops], dtype=int))
        imposed = False
        if group is not None and len(group) > 1:
            candidate = impose_point_group(structure, group)
            if min_separation(candidate.frac_coords, candidate.lattice.matrix) >= MIN_IMPOSED_SEPARATION:
                structure, imposed = candidate, True
        structure.properties["slices_group_imposed"] = imposed
        return structure

    def decode_structures_in_group(self, sequences: Any, lenient: bool | None = None) -> list[Structure | CrystalDecodeError]:
        """``decode_structures`` through ``string_to_structure_in_group`` (the ``"group"`` symmetry mode)."""
        if hasattr(sequences, "sequences"):
            sequences = sequences.sequences
        texts = [decode_or_error(lambda ids=ids: self.ids_to_text(ids)) for ids in to_list(sequences)]
        return [text if not isinstance(text, str) else
                decode_or_error(lambda t=text: self.string_to_structure_in_group(t, lenient)) for text in texts]

    def ids_to_text(self, input_ids: Sequence[int]) -> str:
        """Text of one id sequence: specials dropped, stops at the first ``<eos>`` after content."""
        tokens: list[str] = []
        skip = {self.pad_token_id, self.bos_token_id}
        for token_id in to_list(input_ids):
            if token_id == self.eos_token_id:
                if tokens:
                    break
                continue
            if token_id in skip:
                continue
            token = self._convert_id_to_token(int(token_id))
            if token in (self.unk_token, self.mask_token):
                raise MalformedSequenceError(f"sequence holds the special token {token}")
            tokens.append(token)
        return self.convert_tokens_to_string(tokens)

    def decode_structure(self, input_ids: Sequence[int], lenient: bool | None = None) -> Structure:
        """Decode one id sequence to a ``Structure``; raises ``CrystalDecodeError`` (``lenient``: see
        ``string_to_structure``)."""
        return self.string_to_structure(self.ids_to_text(input_ids), lenient)

    def decode_structures(
        self, sequences: Any, lenient: bool | None = None, num_proc: int = 1
    ) -> list[Structure | CrystalDecodeError]:
        """Decode a batch: ``model.generate`` output (with ``.sequences``), a tensor or lists of ids.

        ``num_proc`` > 1 decodes in that many worker processes (one thread each), in input order;
        ``lenient``: see ``string_to_structure``.
        """
        if hasattr(sequences, "sequences"):
            sequences = sequences.sequences
        texts = [decode_or_error(lambda ids=ids: self.ids_to_text(ids)) for ids in to_list(sequences)]
        return decode_texts_parallel(self, texts, lenient, num_proc)

    def grammar_processor(self, **kwargs: Any):
        """A ``LogitsProcessor`` that only allows parsable, decodable continuations (see ``slices.grammar``)."""
        from crystal_tokenizers.slices.grammar import SlicesGrammarLogitsProcessor

        return SlicesGrammarLogitsProcessor(self, **kwargs)

    # ------------------------------------------------------------------ success criterion
    def graph_matches(self, original: Structure, decoded: Structure) -> bool:
        """Whether ``decoded`` has the labelled quotient graph of ``original`` (same neighbour strategy).

        Offsets are compared up to whole-node lattice shifts (wrapping coordinates); the sites of
        ``decoded`` are expected in the string's node order, as ``string_to_structure`` returns them,
        with an isomorphism search as the fallback for any other order.
        """
        try:
            expected = self.structure_to_graph(original)
            found = structure_to_graph(decoded, self.strategy)
        except CrystalEncodeError:
            return False
        return graphs_match(expected, found)

    def string_graph_matches(self, text: str, decoded: Structure) -> bool:
        """Whether ``decoded`` has the crystal graph written in ``text`` (the SLICES validity check)."""
        try:
            expected = parse_record(text).graph
            found = structure_to_graph(decoded, self.strategy)
        except (CrystalDecodeError, CrystalEncodeError):
            return False
        return graphs_match(expected, found)


_worker_tokenizer: SlicesPlusTokenizer | None = None  # set in each worker process of decode_texts_parallel


def _init_worker(tokenizer: SlicesPlusTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _decode_in_worker(job: tuple[str, bool | None]) -> Structure | CrystalDecodeError:
    text, lenient = job
    return decode_or_error(lambda: _worker_tokenizer.string_to_structure(text, lenient))  # type: ignore[union-attr]


def decode_texts_parallel(
    tokenizer: SlicesPlusTokenizer,
    texts: Sequence[str | CrystalDecodeError],
    lenient: bool | None = None,
    num_proc: int = 1,
) -> list[Structure | CrystalDecodeError]:
    """``tokenizer.string_to_structure`` of every text (an error item passes through), in input order,
    in ``num_proc`` worker processes when > 1 (each decode is single-threaded numpy/scipy)."""
    jobs = [(k, t) for k, t in enumerate(texts) if isinstance(t, str)]
    results: list[Structure | CrystalDecodeError] = list(texts)  # type: ignore[arg-type]
    if num_proc <= 1 or len(jobs) < 2:
        decoded = [decode_or_error(lambda t=t: tokenizer.string_to_structure(t, lenient)) for _, t in jobs]
    else:
        with ProcessPoolExecutor(min(num_proc, len(jobs)), initializer=_init_worker, initargs=(tokenizer,)) as pool:
            decoded = list(pool.map(_decode_in_worker, [(t, lenient) for _, t in jobs], chunksize=1))
    for (k, _), item in zip(jobs, decoded):
        results[k] = item
    return results


SlicesPlusTokenizer.register_for_auto_class("AutoTokenizer")
