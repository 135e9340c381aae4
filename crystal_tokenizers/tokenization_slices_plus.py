"""SlicesPlusTokenizer: the HuggingFace tokenizer for SLICES / SLICES-PLUS crystal-graph strings.

A string is the crystal's labelled quotient graph (node elements, then edges ``i j a b c`` with
periodic-image labels ``-``/``o``/``+``) followed, for SLICES-PLUS, by one six-token group per
symmetry operation (Xiao et al., Nat. Commun. 14, 7027 (2023); Wang et al., SLICES-PLUS). The
grammar and letter tables are in ``crystal_tokenizers.slices.codec``; decoding is our own periodic-net
embedding (``crystal_tokenizers.slices.embedding``), no TensorFlow or ML potential.

Vocabulary (fixed, no files needed): specials, elements H-Lr, node indices ``0 .. max_nodes-1``
(default 64: the published SLICES-PLUS sets have at most 40 nodes, MP-20 at most 20), edge labels,
the 26 rotation-row letters (``o1`` for [-1,-1,0]) and the 13 translation codes ``1s`` .. ``13s``.

Neighbour strategy: the default, ``minimumdistancenn``, was chosen by round-trip success on MP-20
sample crystals (see ``DEFAULT_TOKENIZER_STRATEGY`` for the measured numbers).

The package is imported absolutely so that a saved folder loads with ``trust_remote_code=True``
wherever crystal-lm is installed (CONVENTIONS.md, "Remote code").
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pymatgen.core import Structure
from transformers import BatchEncoding, PreTrainedTokenizer

from crystal_tokenizers.errors import (
    CrystalDecodeError,
    CrystalEncodeError,
    GraphConstructionError,
    MalformedSequenceError,
    UnsupportedElementError,
)
from crystal_tokenizers.slices import codec, embedding, graph as graphs

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
DEFAULT_MAX_NODES = 64
DEFAULT_TOKENIZER_STRATEGY = graphs.DEFAULT_STRATEGY
"""Default neighbour strategy, chosen by round trips (SLICES-PLUS, this decoder) of rows 140-219 of
``../shared/data/mp20_sample/train.csv`` (rows not used while tuning the decoder), graph match /
StructureMatcher match: minimumdistancenn 0.875 / 0.788, econnn 0.825 / 0.800, brunnernn_reciprocal
0.838 / 0.800, crystalnn 0.562 / 0.762. MinimumDistanceNN keeps the most graphs, matches as many
structures within noise, and is the fastest to build."""


def build_vocabulary(max_nodes: int = DEFAULT_MAX_NODES) -> list[str]:
    """The fixed token list, in id order."""
    tokens = list(SPECIAL_TOKENS) + list(codec.ELEMENT_SYMBOLS)
    tokens += [str(k) for k in range(max_nodes)]
    tokens += list(codec.OFFSET_LABELS)
    tokens += list(codec.ROTATION_ROWS)
    tokens += list(codec.TRANSLATION_CODES)
    return tokens


class SlicesPlusTokenizer(PreTrainedTokenizer):
    """Tokenizer for crystals as SLICES-PLUS strings (``symmetry=False``: plain SLICES).

    ``SlicesPlusTokenizer()`` needs no files. ``structure_to_string`` / ``string_to_structure`` convert
    between pymatgen ``Structure`` and text; ``decode_structures`` turns ``model.generate`` output into
    one ``Structure`` or ``CrystalDecodeError`` per sequence; ``graph_matches`` is the SLICES success
    criterion (the decoded crystal has the same labelled quotient graph).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        symmetry: bool = True,
        strategy: str = DEFAULT_TOKENIZER_STRATEGY,
        max_nodes: int = DEFAULT_MAX_NODES,
        symprec: float = codec.ENCODE_SYMPREC,
        angle_tolerance: float = codec.ENCODE_ANGLE_TOLERANCE,
        decode_time_limit_s: float = embedding.EmbeddingParams.time_limit_s,
        decode_attempts: int = len(embedding.RETRY_VARIANTS),
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        mask_token: str = "<mask>",
        **kwargs: Any,
    ) -> None:
        graphs.make_strategy(strategy)  # fail early on an unknown name
        if vocab_file is not None:
            with open(vocab_file, encoding="utf-8") as handle:
                tokens = json.load(handle)
        else:
            tokens = build_vocabulary(max_nodes)
        self._id_to_token = list(tokens)
        self._token_to_id = {token: index for index, token in enumerate(tokens)}
        self.symmetry = symmetry
        self.strategy = strategy
        self.max_nodes = max_nodes
        self.symprec = symprec
        self.angle_tolerance = angle_tolerance
        self.decode_time_limit_s = decode_time_limit_s
        self.decode_attempts = decode_attempts
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
            mask_token=mask_token, symmetry=symmetry, strategy=strategy, max_nodes=max_nodes,
            symprec=symprec, angle_tolerance=angle_tolerance, decode_time_limit_s=decode_time_limit_s,
            decode_attempts=decode_attempts,
            **kwargs,
        )

    # ------------------------------------------------------------------ vocabulary (HF API)
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._token_to_id)
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [piece for word in text.split() for piece in codec.split_joined_labels(word)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, self._token_to_id[self.unk_token])

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index] if 0 <= index < len(self._id_to_token) else self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = [self.bos_token_id] + token_ids_0
        if token_ids_1 is not None:
            ids += token_ids_1
        return ids + [self.eos_token_id]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if token in special else 0 for token in token_ids_0]
        return [1] + [0] * (len(token_ids_0) + len(token_ids_1 or [])) + [1]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self._id_to_token, handle, indent=0)
        return (path,)

    # ------------------------------------------------------------------ crystals -> text
    def structure_to_graph(self, structure: Structure) -> graphs.CrystalGraph:
        """The crystal graph of ``structure`` in canonical node order (see ``slices.graph``)."""
        name = structure.composition.reduced_formula
        unknown = sorted({site.specie.symbol for site in structure if site.specie.symbol not in self._token_to_id})
        if unknown:
            raise UnsupportedElementError(f"{name}: species {unknown} are not in the vocabulary")
        if len(structure) > self.max_nodes:
            raise GraphConstructionError(f"{name}: {len(structure)} sites exceed max_nodes={self.max_nodes}")
        raw = graphs.structure_to_graph(structure, self.strategy)
        graphs.check_sliceable(raw, name)
        return raw.permuted(graphs.canonical_order(raw, structure.frac_coords))

    def structure_to_string(self, structure: Structure, augment: bool = False, seed: int | None = None) -> str:
        """Encode ``structure`` as SLICES(-PLUS) text in canonical node order.

        ``augment=True`` relabels the nodes at random (and shuffles the operations): an equivalent
        string for data augmentation (``seed`` makes it reproducible). Raises ``CrystalEncodeError``.
        """
        crystal_graph = self.structure_to_graph(structure)
        symops: tuple[codec.SymOp, ...] = ()
        if self.symmetry:
            symops = codec.symmetry_operations(structure, self.symprec, self.angle_tolerance)
        if augment:
            crystal_graph, _ = graphs.augment_order(crystal_graph, seed)
            shuffled = list(symops)
            random.Random(seed).shuffle(shuffled)
            symops = tuple(shuffled)
        return codec.format_record(codec.SlicesRecord(crystal_graph, symops))

    def structures_to_strings(self, structures: Iterable[Structure], **kwargs: Any) -> list[str | CrystalEncodeError]:
        """Batch ``structure_to_string``: one string or ``CrystalEncodeError`` per structure."""
        results: list[str | CrystalEncodeError] = []
        for structure in structures:
            try:
                results.append(self.structure_to_string(structure, **kwargs))
            except CrystalEncodeError as err:
                results.append(err)
        return results

    def encode_structure(self, structure: Structure, return_tensors: str | None = None, **kwargs: Any) -> BatchEncoding:
        """Encode ``structure`` straight to ``input_ids`` / ``attention_mask``."""
        return self(self.structure_to_string(structure, **kwargs), return_tensors=return_tensors)

    # ------------------------------------------------------------------ text -> crystals
    def string_to_record(self, text: str) -> codec.SlicesRecord:
        """Parse text into the graph and operations (no geometry built); ``MalformedSequenceError``."""
        record = codec.parse_record(text)
        if record.graph.num_nodes > self.max_nodes:
            raise MalformedSequenceError(f"{record.graph.num_nodes} nodes exceed max_nodes={self.max_nodes}")
        return record

    def string_to_structure(self, text: str) -> Structure:
        """Decode text to a ``Structure`` whose sites follow the string's nodes; ``CrystalDecodeError``."""
        record = self.string_to_record(text)
        params = embedding.EmbeddingParams(time_limit_s=self.decode_time_limit_s)
        return embedding.embed_checked(record.graph, record.symops, self.strategy, params, self.decode_attempts)

    def strings_to_structures(self, texts: Iterable[str]) -> list[Structure | CrystalDecodeError]:
        """Batch ``string_to_structure``: one ``Structure`` or ``CrystalDecodeError`` per text."""
        return [_decode_or_error(lambda text=text: self.string_to_structure(text)) for text in texts]

    def ids_to_text(self, input_ids: Sequence[int]) -> str:
        """Text of one id sequence: specials dropped, stops at the first ``<eos>`` after content."""
        tokens: list[str] = []
        skip = {self.pad_token_id, self.bos_token_id}
        for token_id in _to_list(input_ids):
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

    def decode_structure(self, input_ids: Sequence[int]) -> Structure:
        """Decode one id sequence to a ``Structure``; raises ``CrystalDecodeError``."""
        return self.string_to_structure(self.ids_to_text(input_ids))

    def decode_structures(self, sequences: Any) -> list[Structure | CrystalDecodeError]:
        """Decode a batch: ``model.generate`` output (with ``.sequences``), a tensor or lists of ids."""
        if hasattr(sequences, "sequences"):
            sequences = sequences.sequences
        return [_decode_or_error(lambda ids=ids: self.decode_structure(ids)) for ids in _to_list(sequences)]

    # ------------------------------------------------------------------ success criterion
    def graph_matches(self, original: Structure, decoded: Structure) -> bool:
        """Whether ``decoded`` has the labelled quotient graph of ``original`` (same neighbour strategy).

        Offsets are compared up to whole-node lattice shifts (wrapping coordinates); the sites of
        ``decoded`` are expected in the string's node order, as ``string_to_structure`` returns them,
        with an isomorphism search as the fallback for any other order.
        """
        try:
            expected = self.structure_to_graph(original)
            found = graphs.structure_to_graph(decoded, self.strategy)
        except CrystalEncodeError:
            return False
        return graphs.graphs_match(expected, found)


    def string_graph_matches(self, text: str, decoded: Structure) -> bool:
        """Whether ``decoded`` has the crystal graph written in ``text`` (the SLICES validity check)."""
        try:
            expected = codec.parse_record(text).graph
            found = graphs.structure_to_graph(decoded, self.strategy)
        except (CrystalDecodeError, CrystalEncodeError):
            return False
        return graphs.graphs_match(expected, found)


def _to_list(values: Any) -> list:
    if hasattr(values, "tolist"):
        return values.tolist()
    return [(_to_list(v) if isinstance(v, (list, tuple, np.ndarray)) or hasattr(v, "tolist") else v) for v in values]


def _decode_or_error(decode: Any) -> Any:
    try:
        return decode()
    except CrystalDecodeError as err:
        return err


SlicesPlusTokenizer.register_for_auto_class("AutoTokenizer")
