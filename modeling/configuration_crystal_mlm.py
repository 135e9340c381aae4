"""Configuration of CrystalMLM, the bidirectional (masked) transformer over Wyckoff token sequences.

Sizes and the numeric part are those of :class:`~.configuration_base.NumericTokenConfig`; they and the
element ids are read from the tokenizer (:meth:`CrystalMLMConfig.from_tokenizer`): ``element_token_ids``
are the species a masked site may take and ``mask_token_id`` is ``<mask>``.
"""

import re
from typing import Any

from huggingface_hub.dataclasses import strict

from .configuration_base import NumericTokenConfig

_ELEMENT_SYMBOL = re.compile(r"[A-Z][a-z]?")
"""An element token: one capital letter and at most one lower-case letter (``Na``, ``O``)."""


@strict
class CrystalMLMConfig(NumericTokenConfig):
    r"""
    The fields of `NumericTokenConfig` (sizes, dropout, ``<num>`` and its value kinds), plus:
    classifier_pdrop (`float`): dropout before the sequence-classification head.
    mask_token_id (`int`): id of ``<mask>`` (a masked element site).
    element_token_ids (`list[int]`): ids of the element tokens; at a ``<mask>`` position only these get
        a finite logit.
    position_mse_weight (`float`): weight of the mean squared periodic error (fractional units) of the
        point estimate of each labelled value (Liu et al. 2023 use 200 × MSE; 0 disables it).
    """

    model_type = "crystal_mlm"

    classifier_pdrop: float = 0.1
    mask_token_id: int = 4
    element_token_ids: list[int] | None = None
    position_mse_weight: float = 0.0

    def __post_init__(self, **kwargs: Any) -> None:
        if self.element_token_ids is None:
            self.element_token_ids = []
        super().__post_init__(**kwargs)

    def validate_crystal_mlm(self) -> None:
        """Check that ``<mask>`` and the element ids lie in the vocabulary."""
        ids = [self.mask_token_id, *self.element_token_ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"mask and element token ids {ids} must lie in [0, vocab_size={self.vocab_size}).")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> "CrystalMLMConfig":
        """A config sized to ``tokenizer`` (:meth:`NumericTokenConfig.tokenizer_fields`, ``mask_token_id`` and
        ``element_token_ids`` or else every vocabulary entry shaped like an element symbol); ``kwargs``
        override the rest."""
        element_ids = getattr(tokenizer, "element_token_ids", None)
        if element_ids is None:
            element_ids = [i for token, i in tokenizer.get_vocab().items() if _ELEMENT_SYMBOL.fullmatch(token)]
        fields = {
            **cls.tokenizer_fields(tokenizer),
            "mask_token_id": tokenizer.mask_token_id,
            "element_token_ids": [int(i) for i in element_ids],
        }
        return cls(**{**fields, **kwargs})


CrystalMLMConfig.register_for_auto_class()

__all__ = ["CrystalMLMConfig"]
