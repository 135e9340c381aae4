"""Tokenizers by short name (``wyckoff``, ``slices-plus``, ``slices``) or from a saved folder."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

TOKENIZER_NAMES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "wyckoff": ("crystal_tokenizers.tokenization_wyckoff", "WyckoffTokenizer", {}),
    "slices-plus": ("crystal_tokenizers.tokenization_slices_plus", "SlicesPlusTokenizer", {"symmetry": True}),
    "slices": ("crystal_tokenizers.tokenization_slices_plus", "SlicesPlusTokenizer", {"symmetry": False}),
}


INSTALLED_CLASSES: dict[str, str] = {
    "tokenization_wyckoff.WyckoffTokenizer": "crystal_tokenizers.tokenization_wyckoff",
    "tokenization_slices_plus.SlicesPlusTokenizer": "crystal_tokenizers.tokenization_slices_plus",
}
"""Remote-code class names of a saved folder that the installed package provides itself."""


def _installed_class(folder: Path) -> Any | None:
    """The installed class of a saved folder's tokenizer (its ``auto_map``), or ``None`` if it is not ours."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    auto = json.loads(config.read_text()).get("auto_map", {}).get("AutoTokenizer")
    name = auto[0] if isinstance(auto, (list, tuple)) else auto
    if name not in INSTALLED_CLASSES:
        return None
    return getattr(importlib.import_module(INSTALLED_CLASSES[name]), name.split(".")[-1])


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """A fresh tokenizer for a short name; for a saved folder the installed class (so its errors are the
    package's own), else ``AutoTokenizer.from_pretrained`` with remote code (a Hub id, a foreign folder)."""
    if name_or_path in TOKENIZER_NAMES:
        module_name, class_name, defaults = TOKENIZER_NAMES[name_or_path]
        tokenizer_class = getattr(importlib.import_module(module_name), class_name)
        return tokenizer_class(**{**defaults, **kwargs})
    installed = _installed_class(Path(name_or_path))
    if installed is not None:
        return installed.from_pretrained(name_or_path, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True, **kwargs)
