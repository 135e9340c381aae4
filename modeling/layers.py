"""Transformer pieces shared by the crystal models (GPT-2 layout: ``c_attn``/``c_proj``/``c_fc`` names).

Configs must provide ``n_embd``, ``n_head``, ``n_inner``, ``n_layer``, ``activation_function``, ``attn_pdrop``,
``resid_pdrop``, ``layer_norm_epsilon`` and ``initializer_range``. Attention goes through transformers'
attention interface (``config._attn_implementation``: ``"sdpa"`` by default, ``"eager"`` returns the
attention weights), blocks are ``GradientCheckpointingLayer``s, and masks come from
``transformers.masking_utils``, so hidden states, attentions, gradient checkpointing and ``torch.export``
behave as in transformers' own models. Model files import this module with a one-dot relative import, so
``save_pretrained`` copies it beside them and a saved folder loads with transformers alone.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns its weights (B, H, Tq, Tk); output (B, Tq, H, head_dim).

    ``attention_mask`` is boolean (True = may attend) or additive; with ``None`` a causal module is masked
    causally (keys aligned to the end of the sequence, as with a cache).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None and getattr(module, "is_causal", False) and query.shape[-2] > 1:
        q_len, k_len = query.shape[-2], key.shape[-2]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    weights = F.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class SelfAttention(nn.Module):
    """Multi-head self-attention (causal or bidirectional) with an optional key/value cache."""

    def __init__(self, config: Any, layer_idx: int, is_causal: bool = True) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) -> (B, T, D) and the attention weights (``None`` unless the implementation returns them)."""
        shape = (*hidden_states.shape[:-1], self.n_head, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in self.c_attn(hidden_states).chunk(3, dim=-1))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        dropout = self.attention_dropout if self.training else 0.0
        implementation = self.config._attn_implementation
        if implementation == "sdpa":  # the default: torch's kernel called directly (no grouped heads to expand)
            causal = self.is_causal and attention_mask is None and query.shape[-2] > 1
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=self.scaling
            ).transpose(1, 2)
            weights = None
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
            output, weights = attention(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
        output = self.c_proj(output.reshape(*hidden_states.shape[:-1], -1))
        return self.resid_dropout(output), weights


class FeedForward(nn.Module):
    """Position-wise feed-forward network D -> n_inner -> D."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.act = ACT2FN[config.activation_function]
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """Transformer sinusoidal position encodings (n_positions, dim): sines, then cosines, of geometric frequencies."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    angles = torch.arange(n_positions).float().unsqueeze(-1) * frequencies
    return F.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1), (0, dim - 2 * half))


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position encodings, looked up: integer positions (...) -> (..., dim)."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.n_positions, self.dim = n_positions, dim
        self.register_buffer("table", sinusoidal_table(n_positions, dim), persistent=False)

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """The table (a constant: rebuilt from the sizes, never saved)."""
        return {"table": sinusoidal_table(self.n_positions, self.dim)}

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


class TransformerBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block (causal or bidirectional attention, then the feed-forward network)."""

    def __init__(self, config: Any, layer_idx: int, is_causal: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = SelfAttention(config, layer_idx, is_causal=is_causal)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = FeedForward(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


RECORDABLE_OUTPUTS = {
    "hidden_states": TransformerBlock,
    "attentions": OutputRecorder(SelfAttention, index=1),
}
"""What ``output_hidden_states`` / ``output_attentions`` collect (transformers' output capturing)."""


class CrystalPreTrainedModel(PreTrainedModel):
    """Common base: GPT-2 weight initialisation, gradient checkpointing, SDPA/eager attention, output capture.

    Subclasses set ``config_class``. A module with constant buffers derived from the config (value-embedding
    grids, vocabulary tables) returns them from a ``constant_buffers()`` method: ``_init_weights`` refills
    them (``from_pretrained`` creates them empty) and ``resize_token_embeddings`` rebuilds the model's own.
    """

    base_model_prefix = "transformer"
    _input_embed_layer = "wte"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = RECORDABLE_OUTPUTS

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` with an ``auto_map`` naming every Auto class of the family.

        A folder saved from any head then loads with ``AutoConfig``, ``AutoModel`` and each task class
        (``trust_remote_code=True``), not only with the class that saved it. ``custom_pipelines`` names the
        family's crystal pipelines (``crystal_pipelines.py``, copied beside the model code through the
        relative import below), so that ``pipeline("text-generation" | "fill-mask", model=folder,
        trust_remote_code=True)`` answers with decoded crystals.
        """
        from .crystal_pipelines import custom_pipelines_entry

        module = sys.modules[type(self).__module__]
        family = {
            obj._auto_class: f"{type(self).__module__.split('.')[-1]}.{obj.__name__}"
            for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, CrystalPreTrainedModel)
            and getattr(obj, "_auto_class", None) and obj.config_class is self.config_class
        }
        config_class = type(self.config)
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": f"{config_class.__module__.split('.')[-1]}.{config_class.__name__}",
            **family,
        }
        self.config.custom_pipelines = custom_pipelines_entry(list(family))
        super().save_pretrained(save_directory, *args, **kwargs)

    def add_token_body(self, config: Any, is_causal: bool = True) -> None:
        """Add the body of a one-stack model: token embedding ``wte``, sinusoidal positions ``wpe``, embedding
        dropout, ``n_layer`` blocks ``h`` (causal or bidirectional) and the final layer norm ``ln_f``."""
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = SinusoidalPositions(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(TransformerBlock(config, i, is_causal=is_causal) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def cache_and_positions(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool | None,
    ) -> tuple[Cache | None, torch.LongTensor]:
        """The key/value cache a causal forward reads and fills, and the positions of ``input_ids``.

        The cache is ``cache`` (a new ``DynamicCache`` when none is given), or None when caching is off
        (``use_cache=False``, training by default, or gradient checkpointing). Positions default to the
        count of real tokens before each one (left padding, after the cached ones) and must stay below
        ``n_positions``.
        """
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        cache = (cache if cache is not None else DynamicCache(config=self.config)) if use_cache else None
        if position_ids is None:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = default_position_ids(attention_mask, input_ids.shape[1], past_length).to(input_ids.device)
        check_positions(position_ids, self.config.n_positions)
        return cache, position_ids

    def residual_layers(self) -> int:
        """Blocks on one residual path (the depth that scales the residual projections' initial weights)."""
        return self.config.n_layer

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights; residual projections scaled by 1/sqrt(2 × residual layers);
        constant buffers refilled from ``module.constant_buffers()``."""
        super()._init_weights(module)
        if isinstance(module, (SelfAttention, FeedForward)):
            std = self.config.initializer_range / math.sqrt(2 * self.residual_layers())
            init.normal_(module.c_proj.weight, mean=0.0, std=std)
        refill = getattr(module, "constant_buffers", None)
        if callable(refill):
            for name, value in refill().items():
                init.copy_(getattr(module, name), value)

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """Vocabulary-sized constant buffers of this model, computed from the config (none by default)."""
        return {}

    def register_constant_buffers(self) -> None:
        """(Re-)register this model's :meth:`constant_buffers` (non-persistent: the config is their source)."""
        device = self.get_input_embeddings().weight.device
        for name, value in self.constant_buffers().items():
            self.register_buffer(name, value.to(device), persistent=False)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """``PreTrainedModel.resize_token_embeddings``, then the vocabulary buffers rebuilt for the new size.

        Appended ids get the value kind ``config.added_token_kind`` when the config has one (WyckoffGPT:
        ``"scalar"``, new ``prop:`` labels), so a base resized to an adapter's tokenizer knows the adapter's
        new property tokens from its own config. Otherwise new tokens carry no value kind and are no elements
        unless the config says so: update ``config.numeric_kind_token_ids`` / ``element_token_ids`` first.
        """
        old_size = self.get_input_embeddings().weight.shape[0]
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        kinds = getattr(self.config, "numeric_kind_token_ids", None)
        if kinds is not None:
            self.config.numeric_kind_token_ids = resized_kinds(
                kinds, old_size, embeddings.weight.shape[0], getattr(self.config, "added_token_kind", None)
            )
        self.register_constant_buffers()
        return embeddings


def resized_kinds(
    kinds: dict[str, list[int]], old_size: int, new_size: int, added_kind: str | None
) -> dict[str, list[int]]:
    """Label ids per value kind after a vocabulary resize: ids past ``new_size`` dropped, appended ids
    (``old_size`` .. ``new_size - 1``) given ``added_kind`` when it is one of ``kinds`` (a kind the value head has)."""
    resized = {kind: [i for i in ids if i < new_size] for kind, ids in kinds.items()}
    if added_kind in resized:
        listed = set(resized[added_kind])
        resized[added_kind] += [i for i in range(old_size, new_size) if i not in listed]
    return resized


def default_position_ids(attention_mask: torch.Tensor | None, query_length: int, past_length: int) -> torch.Tensor:
    """Positions (B|1, T) of the current tokens, counted over real tokens when a padding mask is given (left padding)."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length).unsqueeze(0)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -query_length:]


def check_positions(position_ids: torch.Tensor, n_positions: int) -> None:
    """Refuse positions past ``n_positions`` (skipped while compiling or exporting: a data-dependent check)."""
    if not is_torchdynamo_compiling() and int(position_ids.max()) >= n_positions:
        raise ValueError(f"Sequence position {int(position_ids.max())} exceeds n_positions={n_positions}.")


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    """MSE (regression), cross-entropy (single label) or BCE (multi-label), chosen by ``config.problem_type``."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.reshape(labels.shape[0], -1), labels.float().reshape(labels.shape[0], -1))
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.float())


__all__ = [
    "CrystalPreTrainedModel",
    "FeedForward",
    "RECORDABLE_OUTPUTS",
    "SelfAttention",
    "SinusoidalPositions",
    "TransformerBlock",
    "check_positions",
    "default_position_ids",
    "eager_attention_forward",
    "resized_kinds",
    "sequence_classification_loss",
]
