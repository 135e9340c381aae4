"""Configuration of WyckoffGPT, the hybrid discrete-continuous GPT over Wyckoff token sequences.

Sizes and the numeric part are those of :class:`~.configuration_base.NumericTokenConfig`, read from the
tokenizer by :meth:`WyckoffGPTConfig.from_tokenizer`.
"""

from typing import Any

from huggingface_hub.dataclasses import strict

from .configuration_base import NumericTokenConfig


@strict
class WyckoffGPTConfig(NumericTokenConfig):
    r"""
    The fields of `NumericTokenConfig` (sizes, dropout, ``<num>`` and its value kinds), plus:
    added_token_kind (`str | None`): value kind that ``resize_token_embeddings`` gives the ids it appends
        (``"scalar"``: new ``prop:<name>`` labels, the open end of the Wyckoff vocabulary); ``None``: no kind.
    use_cache (`bool`): return the key/value cache from the forward pass.
    """

    model_type = "wyckoff_gpt"

    added_token_kind: str | None = "scalar"
    use_cache: bool = True

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> "WyckoffGPTConfig":
        """A config sized to ``tokenizer`` (see :meth:`NumericTokenConfig.tokenizer_fields`); ``kwargs``
        override the rest."""
        return cls(**{**cls.tokenizer_fields(tokenizer), **kwargs})


WyckoffGPTConfig.register_for_auto_class()

__all__ = ["WyckoffGPTConfig"]
