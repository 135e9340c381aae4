"""Tokenizers by short name (``wyckoff``, ``slices-plus``, ``slices``) or from a saved folder."""

from __future__ import annotations

import importlib
from typing import Any

TOKENIZER_NAMES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "wyckoff": ("crystal_tokenizers.tokenization_wyckoff", "WyckoffTokenizer", {}),
    "slices-plus": ("crystal_tokenizers.tokenization_slices_plus", "SlicesPlusTokenizer", {"symmetry": True}),
    "slices": ("crystal_tokenizers.tokenization_slices_plus", "SlicesPlusTokenizer", {"symmetry": False}),
}


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """A fresh tokenizer for a short name, or ``AutoTokenizer.from_pretrained`` (remote code) for a path."""
    if name_or_path in TOKENIZER_NAMES:
        module_name, class_name, defaults = TOKENIZER_NAMES[name_or_path]
        tokenizer_class = getattr(importlib.import_module(module_name), class_name)
        return tokenizer_class(**{**defaults, **kwargs})
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True, **kwargs)
