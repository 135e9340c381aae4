"""Transformer layers shared by the crystal models (GPT-2 layout: ``c_attn``/``c_proj``/``c_fc`` names).

Configs must provide ``n_embd``, ``n_head``, ``n_inner``, ``activation_function``, ``attn_pdrop``,
``resid_pdrop`` and ``layer_norm_epsilon``. Model files import this module absolutely, so saved folders
load with ``trust_remote_code=True`` wherever crystal-lm is installed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention through ``F.scaled_dot_product_attention``, with a KV cache."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(width, dim=2)
        )
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=mask is None and length > 1,
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, length, width)))


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


class CausalBlock(nn.Module):
    """Pre-LayerNorm causal transformer block."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))
