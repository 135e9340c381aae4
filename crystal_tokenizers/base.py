"""What every crystal tokenizer shares: a fixed vocabulary, ``<bos> … <eos>`` framing, batch APIs.

Subclasses provide the vocabulary, ``_tokenize``, ``structure_to_string``, ``string_to_structure`` and
``decode_structure``; batch methods return one result or one typed error per item and never raise for
a single bad item.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from pymatgen.core import Structure
from transformers import BatchEncoding, PreTrainedTokenizer

from crystal_tokenizers.bundle import PACKAGE, write_bundle
from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
"""The package-wide special tokens: pad, bos, eos, unk and mask, in id order 0–4."""
VOCAB_FILE = "vocab.json"


class CrystalTokenizerBase(PreTrainedTokenizer):
    """A ``PreTrainedTokenizer`` over a fixed, ordered token list (saved as ``vocab.json``)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}

    def _set_vocabulary(self, tokens: Sequence[str]) -> None:
        """Install the ordered token list (call before ``super().__init__``)."""
        self._id_to_token = list(tokens)
        self._token_to_id = {token: index for index, token in enumerate(tokens)}

    @staticmethod
    def _read_vocabulary(vocab_file: str) -> list[str]:
        with open(vocab_file, encoding="utf-8") as handle:
            return json.load(handle)

    # ------------------------------------------------------------------ vocabulary (HF API)
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._token_to_id)
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, self._token_to_id[self.unk_token])

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index] if 0 <= index < len(self._id_to_token) else self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [self.bos_token_id] + token_ids_0 + (token_ids_1 or []) + [self.eos_token_id]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if token in special else 0 for token in token_ids_0]
        return [1] + [0] * (len(token_ids_0) + len(token_ids_1 or [])) + [1]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """``PreTrainedTokenizer.save_pretrained``, plus the flat copy of the code the tokenizer needs.

        The folder then loads with ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`` where
        crystal-lm is not installed (see :mod:`crystal_tokenizers.bundle`).
        """
        push_to_hub = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
        files = super().save_pretrained(save_directory, *args, **kwargs)
        if type(self).__module__.startswith(PACKAGE + "."):
            files = (*files, *(str(path) for path in write_bundle(type(self).__module__, save_directory)))
        if push_to_hub:  # push_to_hub saves again into a temporary folder, bundle included
            self.push_to_hub(repo_id, token=kwargs.get("token"))
        return files

    def fitted_records(self) -> dict[str, Any]:
        """File name -> what the tokenizer learnt of its training data (a ``records.JsonRecord``, or ``None``
        when not fitted); each fitted one is saved beside ``vocab.json``. The base tokenizer learns nothing."""
        return {}

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """``vocab.json`` and every fitted record (:meth:`fitted_records`)."""
        prefix = filename_prefix + "-" if filename_prefix else ""
        path = os.path.join(save_directory, prefix + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self._id_to_token, handle, indent=0)
        files = [path]
        for name, record in self.fitted_records().items():
            if record is not None:
                files.append(os.path.join(save_directory, prefix + name))
                record.save(files[-1])
        return tuple(files)

    def fit_training_statistics(self, texts: Sequence[str]) -> Any:
        """Learn what this tokenizer keeps of its training data from the training ``texts`` (saved with it).

        ``crystal-lm train`` calls it on the train split before training. The base tokenizer keeps
        nothing; Wyckoff keeps element co-occurrence counts, SLICES-PLUS its coordination table.
        """
        return None

    # ------------------------------------------------------------------ batch APIs
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
        """Encode ``structure`` straight to model inputs (``kwargs`` go to ``structure_to_string``)."""
        return self(self.structure_to_string(structure, **kwargs), return_tensors=return_tensors)

    def strings_to_structures(self, texts: Iterable[str]) -> list[Structure | CrystalDecodeError]:
        """Batch ``string_to_structure``: one ``Structure`` or ``CrystalDecodeError`` per text."""
        return [decode_or_error(lambda text=text: self.string_to_structure(text)) for text in texts]


def to_list(values: Any) -> list:
    """Nested Python lists from a tensor, an array or nested sequences of them."""
    if values is None:
        return []
    if hasattr(values, "tolist"):
        return values.tolist()
    return [(to_list(v) if isinstance(v, (list, tuple, np.ndarray)) or hasattr(v, "tolist") else v) for v in values]


def decode_or_error(decode: Callable[[], Structure]) -> Structure | CrystalDecodeError:
    """``decode()``, or the ``CrystalDecodeError`` it raised."""
    try:
        return decode()
    except CrystalDecodeError as err:
        return err
