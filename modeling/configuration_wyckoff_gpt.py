"""Configuration of WyckoffGPT, the hybrid discrete-continuous GPT over Wyckoff token sequences.

Sizes follow GPT-2's names (``n_layer``, ``n_head``, ``n_embd``, ``n_inner``). The numeric part is
read from the tokenizer (:meth:`WyckoffGPTConfig.from_tokenizer`): ``num_token_id`` is the ``<num>``
token that stands for every continuous value, and ``numeric_kind_token_ids`` maps each value kind
(``fractional``, ``length``, ``angle``, ``scalar``) to its label tokens: the label at position t tells
the kind of the value at t + 1. The model never needs the crystallography behind these ids.
"""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class WyckoffGPTConfig(PreTrainedConfig):
    r"""
    vocab_size (`int`): tokenizer vocabulary size.
    n_positions (`int`): maximum sequence length in tokens (sinusoidal positions).
    n_embd / n_layer / n_head / n_inner (`int`): width, blocks, heads, feed-forward width.
    activation_function (`str`): feed-forward activation, a key of ``transformers.activations.ACT2FN``.
    embd_pdrop / attn_pdrop / resid_pdrop (`float`): dropout on embeddings, attention weights, block outputs.
    num_token_id (`int`): id of ``<num>``.
    numeric_kind_token_ids (`dict[str, list[int]]`): label token ids per value kind (kinds of
        ``modeling.numeric.DEFAULT_VALUE_KINDS``).
    num_mixture_components (`int`): components of each value kind's mixture.
    numeric_loss_weight (`float`): weight of the value negative log-likelihood in the loss.
    value_linear_ranges (`list[list[float]]`): linear Gaussian grids of the value embedding (data units).
    value_num_linear (`int`) / value_log_range (`list[float]`) / value_num_log (`int`): grid sizes and the
        ``|v|`` range of the log grid.
    added_token_kind (`str | None`): value kind that ``resize_token_embeddings`` gives the ids it appends
        (``"scalar"``: new ``prop:<name>`` labels, the open end of the Wyckoff vocabulary); ``None``: no kind.
    """

    model_type = "wyckoff_gpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 1500
    n_positions: int = 512
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_inner: int = 1024
    activation_function: str = "gelu"
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    num_token_id: int = 5
    numeric_kind_token_ids: dict[str, list[int]] | None = None
    num_mixture_components: int = 8
    numeric_loss_weight: float = 1.0
    value_linear_ranges: list[list[float]] | None = None
    value_num_linear: int = 32
    value_log_range: list[float] | None = None
    value_num_log: int = 64
    added_token_kind: str | None = "scalar"
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.numeric_kind_token_ids is None:
            self.numeric_kind_token_ids = {}
        if self.value_linear_ranges is None:
            self.value_linear_ranges = [[0.0, 1.0], [-10.0, 10.0], [0.0, 200.0]]
        if self.value_log_range is None:
            self.value_log_range = [1e-3, 1e3]
        super().__post_init__(**kwargs)

    def validate_wyckoff_gpt(self) -> None:
        """Check that the width splits into heads and that the numeric ids lie in the vocabulary."""
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}).")
        ids = [self.num_token_id] + [i for label_ids in self.numeric_kind_token_ids.values() for i in label_ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"numeric token ids {ids} must lie in [0, vocab_size={self.vocab_size}).")
        if self.num_mixture_components < 1:
            raise ValueError(f"num_mixture_components must be >= 1, got {self.num_mixture_components}.")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> "WyckoffGPTConfig":
        """A config sized to ``tokenizer`` (duck-typed: ``len()``, ``num_token_id``,
        ``numeric_kind_token_ids`` and the special-token ids); ``kwargs`` override the rest."""
        return cls(
            vocab_size=len(tokenizer),
            num_token_id=tokenizer.num_token_id,
            numeric_kind_token_ids={kind: list(ids) for kind, ids in tokenizer.numeric_kind_token_ids.items()},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )


WyckoffGPTConfig.register_for_auto_class()

__all__ = ["WyckoffGPTConfig"]
