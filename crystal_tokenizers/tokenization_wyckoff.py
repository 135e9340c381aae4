"""WyckoffTokenizer: the HuggingFace tokenizer around the Wyckoff-with-coordinates codec.

The vocabulary is fixed (no training): specials, structural tokens, crystal systems, space groups,
elements, the 940 shared orbit tokens, count tokens, stability and property tokens, and the value
labels. Continuous values are the single token ``<num>``; their floats travel beside ``input_ids`` as
``numeric_values`` (NaN elsewhere). Format: ``docs/wyckoff_format.md``.

The codec is imported absolutely so that a saved folder loads with ``trust_remote_code=True`` wherever
crystal-lm is installed (CONVENTIONS.md, "Remote code").
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from pymatgen.core import Structure
from transformers import BatchEncoding

from crystal_tokenizers.base import SPECIAL_TOKENS, CrystalTokenizerBase, decode_or_error, to_list
from crystal_tokenizers.errors import CrystalDecodeError, MalformedSequenceError
from crystal_tokenizers.wyckoff import codec
from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS
from crystal_tokenizers.wyckoff.orbits import FREE_PARAMETER_NAMES, load_orbit_table
from crystal_tokenizers.wyckoff.statistics import ELEMENT_STATISTICS_FILE, ElementStatistics

STRUCTURAL_TOKENS = (codec.NUM, codec.SEP, codec.LAT, codec.ELEMENTS_MARK, codec.COMPOSITION_MARK)
VALUE_LABELS = FREE_PARAMETER_NAMES + codec.LENGTH_NAMES + codec.ANGLE_NAMES


def build_vocabulary(property_names: Sequence[str] = codec.DEFAULT_PROPERTY_NAMES) -> list[str]:
    """The fixed token list, in id order."""
    tokens = list(SPECIAL_TOKENS) + list(STRUCTURAL_TOKENS) + list(VALUE_LABELS)
    tokens += [f"cs:{name}" for name in CRYSTAL_SYSTEMS]
    tokens += [f"sg:{n}" for n in range(1, 231)]
    tokens += list(codec.ELEMENTS)
    tokens += list(load_orbit_table().tokens)
    tokens += [f"n:{k}" for k in range(1, codec.MAX_COUNT + 1)]
    tokens += ["stab:low", "stab:high"]
    tokens += [f"prop:{name}" for name in property_names]
    return tokens


class WyckoffTokenizer(CrystalTokenizerBase):
    """Tokenizer for crystals as space group + Wyckoff orbits + free coordinates + lattice.

    ``WyckoffTokenizer()`` needs no files. ``structure_to_string`` / ``string_to_structure`` convert
    between pymatgen ``Structure`` and text; ``tokenizer(text)`` returns ``input_ids``,
    ``attention_mask`` and ``numeric_values``; ``decode_structures`` turns ``model.generate`` output
    into one ``Structure`` or ``CrystalDecodeError`` per sequence.
    """

    model_input_names = ["input_ids", "attention_mask", "numeric_values"]
    vocab_files_names = {**CrystalTokenizerBase.vocab_files_names, "element_statistics_file": ELEMENT_STATISTICS_FILE}

    def __init__(
        self,
        vocab_file: str | None = None,
        element_statistics_file: str | None = None,
        property_names: Sequence[str] = codec.DEFAULT_PROPERTY_NAMES,
        symprec: float = codec.DEFAULT_SYMPREC,
        angle_tolerance: float = -1.0,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        mask_token: str = "<mask>",
        **kwargs: Any,
    ) -> None:
        self._set_vocabulary(self._read_vocabulary(vocab_file) if vocab_file else build_vocabulary(property_names))
        self.property_names = tuple(property_names)
        self.symprec = symprec
        self.angle_tolerance = angle_tolerance
        self.element_statistics: ElementStatistics | None = (
            ElementStatistics.load(element_statistics_file) if element_statistics_file else None
        )
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
            mask_token=mask_token, property_names=list(property_names), symprec=symprec,
            angle_tolerance=angle_tolerance, **kwargs,
        )

    def with_properties(self, names: Sequence[str]) -> "WyckoffTokenizer":
        """A copy that also conditions on ``names``: one ``prop:<name>`` token each, appended at the end of
        the vocabulary so that every existing id stays. Raises ``ValueError`` for a name it already has."""
        known = [name for name in names if name in self.property_names]
        if known or len(set(names)) != len(names):
            raise ValueError(f"properties {list(names)}: {known or 'duplicates'} already in this tokenizer's "
                             f"property_names {self.property_names}")
        tokens = [self._convert_id_to_token(i) for i in range(self.vocab_size)] + [f"prop:{name}" for name in names]
        clash = [token for token in tokens[self.vocab_size:] if token in self._token_to_id]
        if clash:
            raise ValueError(f"tokens {clash} are already in the vocabulary")
        extended = type(self)(property_names=[*self.property_names, *names], symprec=self.symprec,
                              angle_tolerance=self.angle_tolerance)
        extended._set_vocabulary(tokens)
        extended.element_statistics = self.element_statistics
        return extended

    def fitted_records(self) -> dict[str, Any]:
        """The element statistics, saved as ``element_statistics.json`` when the tokenizer has them."""
        return {ELEMENT_STATISTICS_FILE: self.element_statistics}

    def fit_training_statistics(self, texts: Sequence[str]) -> ElementStatistics:
        """Count which elements the training ``texts`` hold and which occur together
        (:class:`~crystal_tokenizers.wyckoff.statistics.ElementStatistics`), keep them on the tokenizer (saved
        with it; the inpainting ranker's co-occurrence prior reads them) and return them."""
        self.element_statistics = ElementStatistics.from_token_lists(self._tokenize(text) for text in texts)
        return self.element_statistics

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [codec.NUM if codec.is_number_literal(word) else word for word in text.split()]

    # ------------------------------------------------------------------ numeric values
    @property
    def num_token_id(self) -> int:
        """Id of ``<num>``, the token that stands for every continuous value."""
        return self._token_to_id[codec.NUM]

    @property
    def numeric_kind_token_ids(self) -> dict[str, list[int]]:
        """Label token ids per value kind: the label right before a ``<num>`` tells its kind."""
        kinds: dict[str, list[int]] = {"fractional": [], "length": [], "angle": [], "scalar": []}
        for label in VALUE_LABELS:
            kinds[codec.value_kind(label)].append(self._token_to_id[label])
        kinds["scalar"] = [self._token_to_id[f"prop:{name}"] for name in self.property_names]
        return kinds

    @property
    def element_token_ids(self) -> list[int]:
        """Ids of the element tokens H..Lr (the species a masked model may predict)."""
        return [self._token_to_id[symbol] for symbol in codec.ELEMENTS]

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> BatchEncoding:
        is_single_text = isinstance(text, str) and (text_pair is None or isinstance(text_pair, str))
        if not is_single_text:
            return super()._encode_plus(text, text_pair, **kwargs)
        return_tensors = kwargs.pop("return_tensors", None)
        encoding = super()._encode_plus(text, text_pair, return_tensors=None, **kwargs)
        values = [t for t in codec.text_to_tokens(text) + codec.text_to_tokens(text_pair or "") if not isinstance(t, str)]
        encoding["numeric_values"] = self._place_values(encoding["input_ids"], values, kwargs)
        return BatchEncoding(encoding.data, tensor_type=return_tensors, prepend_batch_axis=return_tensors is not None)

    def _place_values(self, input_ids: list[int], values: list[float], kwargs: dict[str, Any]) -> list[float]:
        """Put ``values`` on the ``<num>`` positions of ``input_ids`` (NaN elsewhere), truncation-aware."""
        slots = [i for i, token in enumerate(input_ids) if token == self.num_token_id]
        if len(slots) < len(values) and kwargs.get("truncation_strategy") and self.truncation_side == "left":
            values = values[len(values) - len(slots):]
        placed = [math.nan] * len(input_ids)
        for slot, value in zip(slots, values):
            placed[slot] = float(value)
        return placed

    def pad(self, encoded_inputs: Any, *args: Any, **kwargs: Any) -> BatchEncoding:
        """``PreTrainedTokenizer.pad`` that also pads ``numeric_values`` (with NaN, on the padding side)."""
        items = encoded_inputs
        if isinstance(items, (list, tuple)) and items and isinstance(items[0], (dict, BatchEncoding)):
            items = {key: [item[key] for item in items] for key in items[0].keys()}
        if not isinstance(items, (dict, BatchEncoding)) or "numeric_values" not in items:
            return super().pad(encoded_inputs, *args, **kwargs)
        return_tensors = kwargs.pop("return_tensors", None)
        side = kwargs.get("padding_side") or self.padding_side
        padded = super().pad({k: v for k, v in items.items() if k != "numeric_values"}, *args, **kwargs)
        ids = to_list(padded["input_ids"])
        values = to_list(items["numeric_values"])
        batched = bool(ids) and isinstance(ids[0], list)
        rows = []
        for id_row, value_row in zip(ids if batched else [ids], values if batched else [values]):
            fill = [math.nan] * (len(id_row) - len(value_row))
            rows.append(fill + value_row if side == "left" else value_row + fill)
        padded["numeric_values"] = rows if batched else rows[0]
        return BatchEncoding(padded.data, tensor_type=return_tensors)

    # ------------------------------------------------------------------ crystals
    def structure_to_string(self, structure: Structure, **conditions: Any) -> str:
        """Encode ``structure`` as text; ``conditions`` (e.g. ``crystal_system=True``) become the prefix.

        Condition keywords: ``crystal_system``, ``space_group``, ``elements``, ``composition`` (``True``
        takes them from the structure), ``stability`` ("low"/"high") or ``e_above_hull`` (eV/atom),
        ``properties`` (``{name: value}``). Raises ``CrystalEncodeError`` for unsupported input.
        """
        crystal = codec.structure_to_crystal(structure, symprec=self.symprec, angle_tolerance=self.angle_tolerance)
        resolved = codec.conditions_for_structure(structure, crystal, **conditions)
        unknown = [name for name, _ in resolved.properties if name not in self.property_names]
        if unknown:
            raise ValueError(f"properties {unknown} are not in this tokenizer's property_names {self.property_names}")
        return codec.tokens_to_text(codec.conditions_to_tokens(resolved) + [codec.SEP] + codec.crystal_to_tokens(crystal))

    def condition_prefix(self, **conditions: Any) -> str:
        """Prompt text for generation: the condition prefix followed by ``<sep>``.

        Takes explicit values only: ``crystal_system``, ``space_group``, ``elements``, ``composition``
        (conventional-cell counts), ``stability``, ``properties``.
        """
        resolved = codec.Conditions(
            crystal_system=conditions.get("crystal_system"),
            space_group=conditions.get("space_group"),
            elements=tuple(conditions["elements"]) if conditions.get("elements") else None,
            composition=tuple(dict(conditions["composition"]).items()) if conditions.get("composition") else None,
            stability=conditions.get("stability"),
            properties=tuple(dict(conditions.get("properties") or {}).items()),
        )
        return codec.tokens_to_text(codec.conditions_to_tokens(resolved) + [codec.SEP])

    def prompt_inputs(self, prompts: Sequence[str] | None = None, return_tensors: str = "pt", **conditions: Any) -> BatchEncoding:
        """Model inputs for ``generate``: ``<bos> prompt`` per prompt, left-padded, no ``<eos>``.

        Without ``prompts``, one prompt is built from ``conditions`` (see :meth:`condition_prefix`).
        """
        texts = list(prompts) if prompts is not None else [self.condition_prefix(**conditions)]
        side = self.padding_side
        self.padding_side = "left"
        try:
            return self([f"{self.bos_token} {text}" for text in texts], add_special_tokens=False, padding=True,
                        return_tensors=return_tensors)
        finally:
            self.padding_side = side

    def string_to_crystal(self, text: str) -> codec.WyckoffCrystal:
        """Parse text into the codec's ``WyckoffCrystal`` (no geometry built)."""
        return codec.tokens_to_crystal(codec.text_to_tokens(text))

    def string_to_structure(self, text: str) -> Structure:
        """Decode text to the conventional-cell ``Structure``; raises ``CrystalDecodeError``."""
        return codec.crystal_to_structure(self.string_to_crystal(text))

    def ids_to_tokens_with_values(self, input_ids: Sequence[int], numeric_values: Sequence[float] | None) -> list[str | float]:
        """Token strings for ``input_ids`` with each ``<num>`` replaced by its float value."""
        ids = to_list(input_ids)
        if numeric_values is None and self.num_token_id in ids:
            raise MalformedSequenceError(
                "the sequence has <num> tokens but no numeric values: decode model.generate's output object "
                "(its numeric_values; keep return_dict_in_generate=True, the default of crystal-lm's generators) "
                "or pass numeric_values aligned with the ids"
            )
        values = to_list(numeric_values) if numeric_values is not None else [math.nan] * len(ids)
        if len(values) != len(ids):
            raise MalformedSequenceError(f"{len(ids)} token ids but {len(values)} numeric values")
        tokens: list[str | float] = []
        for token_id, value in zip(ids, values):
            token = self._convert_id_to_token(int(token_id))
            tokens.append(float(value) if token == codec.NUM else token)
        return tokens

    def ids_to_text(self, input_ids: Sequence[int], numeric_values: Sequence[float] | None = None) -> str:
        """Crystal text of one id sequence with its values (what ``string_to_structure`` reads): ``<bos>`` and
        padding dropped, stops at the first ``<eos>`` after content."""
        words: list[str | float] = []
        skip = {self.bos_token, self.pad_token}
        for token in self.ids_to_tokens_with_values(input_ids, numeric_values):
            if token == self.eos_token:
                if words:
                    break
                continue
            if not (isinstance(token, str) and token in skip):
                words.append(token)
        return codec.tokens_to_text(words)

    def decode_structure(self, input_ids: Sequence[int], numeric_values: Sequence[float] | None = None) -> Structure:
        """Decode one id sequence (with its ``numeric_values``) to a ``Structure``."""
        tokens = self.ids_to_tokens_with_values(input_ids, numeric_values)
        return codec.crystal_to_structure(codec.tokens_to_crystal(tokens))

    def decode_structures(
        self, sequences: Any, numeric_values: Any = None
    ) -> list[Structure | CrystalDecodeError]:
        """Decode a batch: ``model.generate`` output (with ``.sequences`` and ``.numeric_values``) or ids."""
        if hasattr(sequences, "sequences"):
            numeric_values = getattr(sequences, "numeric_values", numeric_values)
            sequences = sequences.sequences
        rows = to_list(sequences)
        value_rows = to_list(numeric_values) if numeric_values is not None else [None] * len(rows)
        return [
            decode_or_error(lambda ids=ids, vals=vals: self.decode_structure(ids, vals))
            for ids, vals in zip(rows, value_rows)
        ]

    def grammar_processor(self, **kwargs: Any):
        """A ``LogitsProcessor`` that only allows decodable continuations (see ``wyckoff.grammar``)."""
        from crystal_tokenizers.wyckoff.grammar import WyckoffGrammarLogitsProcessor

        return WyckoffGrammarLogitsProcessor(self, **kwargs)


WyckoffTokenizer.register_for_auto_class("AutoTokenizer")
