"""CrystalMLM: a bidirectional transformer over Wyckoff token sequences (masked species + noisy values).

Architecture (Liu et al., "Self-supervised generative models for crystal structures", arXiv:2312.14485,
on the token format of ``docs/wyckoff_format.md``)::

    e_t    = token_embedding(id_t) + [v_t finite] * value_embedding(v_t) + sinusoid(position_t)
    h      = LayerNorm(blocks(dropout(e)))          pre-LayerNorm blocks, GELU MLPs, SDPA, no causal mask
    logits = lm_head(h)                             token at t (tied to the token embedding); at a
                                                    <mask> position only element tokens are allowed
    params = numeric_head(h_t, kind(id_{t-1}))      mixture of the clean value of the <num> at t

``CrystalMLMForMaskedLM`` reconstructs a damaged crystal: element tokens replaced by ``<mask>`` and
noisy coordinate values. Its loss counts only labelled positions: species cross-entropy where
``labels != -100`` + ``numeric_loss_weight`` × value NLL + ``position_mse_weight`` × periodic MSE of the
point estimate, both where ``numeric_labels`` is finite. ``CrystalMLMForSequenceClassification`` puts a
linear head on the mean of the real tokens' states (stability classification, property regression, the
critic of adversarial fine-tuning). Every model also takes ``inputs_embeds``: a soft species distribution
times the embedding matrix lets gradients flow from a critic into a generator without sampling.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from modeling.configuration_crystal_mlm import CrystalMLMConfig
from modeling.layers import FeedForward
from modeling.modeling_mattergpt import sequence_classification_loss
from modeling.modeling_wyckoff_gpt import kind_lookup, sinusoidal_positions
from modeling.numeric import (
    DEFAULT_VALUE_KINDS,
    NO_KIND,
    GaussianValueEmbedding,
    NumericValueHead,
    ValueKind,
)

logger = logging.getLogger(__name__)


def padding_mask_4d(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B, 1, 1, T) key mask for SDPA, True where a key is a real token; ``None`` without padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].bool()


def periodic_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` of fractional coordinates wrapped to [-0.5, 0.5) (minimum image)."""
    return torch.remainder(a - b + 0.5, 1.0) - 0.5


def mixture_point_estimate(kind: ValueKind, params: torch.Tensor) -> torch.Tensor:
    """Differentiable point estimate (N,) of raw mixture parameters (N, 3, M), in data units.

    Von Mises: the weighted circular mean of the component locations, as a fraction in [0, 1). Other
    families: the weighted mean of the standardised locations, mapped back to data units.
    """
    logits, loc, _ = params.float().unbind(dim=-2)
    weights = torch.softmax(logits, dim=-1)
    if kind.family == "von_mises":
        angle = torch.atan2((weights * torch.sin(loc)).sum(-1), (weights * torch.cos(loc)).sum(-1))
        return torch.remainder(angle / (2.0 * math.pi), 1.0)
    z = (weights * loc).sum(-1)
    if kind.family == "log_normal":
        return torch.exp(kind.location + kind.scale * z)
    return kind.location + kind.scale * z


def value_embedding(config: CrystalMLMConfig) -> GaussianValueEmbedding:
    """The Gaussian value embedding of ``config``'s grids."""
    return GaussianValueEmbedding(
        config.n_embd, linear_ranges=config.value_linear_ranges, num_linear=config.value_num_linear,
        log_range=config.value_log_range, num_log=config.value_num_log,
    )


def non_element_mask(config: CrystalMLMConfig) -> torch.Tensor:
    """(vocab_size,) boolean tensor, True for every token that is not an element."""
    mask = torch.ones(config.vocab_size, dtype=torch.bool)
    mask[torch.as_tensor(config.element_token_ids, dtype=torch.long)] = False
    return mask


class CrystalMLMAttention(nn.Module):
    """Bidirectional multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: CrystalMLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(width, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(batch, length, width)))


class CrystalMLMBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: CrystalMLMConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CrystalMLMAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class CrystalMLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation (GPT-2 scheme) and the ``from_pretrained`` plumbing."""

    config_class = CrystalMLMConfig
    config: CrystalMLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CrystalMLMBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights; residual projections scaled by 1/sqrt(2 n_layer).

        Also fills the non-persistent buffers (value-embedding grids, value kind per token, non-element
        tokens), which ``from_pretrained`` creates empty.
        """
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (CrystalMLMAttention, FeedForward)):
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        if isinstance(module, GaussianValueEmbedding):  # constant buffers: rebuilt, never learned
            linear_centres, log_centres = module.centre_grids()
            init.copy_(module.linear_centres, linear_centres)
            init.copy_(module.log_centres, log_centres)
        if isinstance(module, CrystalMLMForMaskedLM):
            init.copy_(module.kind_of_token, kind_lookup(self.config)[1])
            init.copy_(module.not_element, non_element_mask(self.config))


class CrystalMLMModel(CrystalMLMPreTrainedModel):
    """Token (or given) + value + sinusoidal position embeddings and ``n_layer`` bidirectional blocks."""

    def __init__(self, config: CrystalMLMConfig) -> None:
        super().__init__(config)
        config.validate_crystal_mlm()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.value_embedding = value_embedding(config)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(CrystalMLMBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def embed(
        self,
        input_ids: torch.LongTensor | None,
        numeric_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (or ``inputs_embeds``) plus value embeddings wherever a value is finite.

        With ``input_ids`` a value counts only on a ``<num>`` token; with ``inputs_embeds`` alone every
        finite entry of ``numeric_values`` is a value (the convention: NaN at every other position).
        """
        embeddings = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if numeric_values is None:
            return embeddings
        values = numeric_values.to(embeddings.device)
        has_value = torch.isfinite(values)
        if input_ids is not None:
            has_value = has_value & (input_ids == self.config.num_token_id)
        if not bool(has_value.any()):
            return embeddings
        safe = torch.where(has_value, values, torch.zeros_like(values))
        return embeddings + self.value_embedding(safe) * has_value.unsqueeze(-1).to(embeddings.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        numeric_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (or give `inputs_embeds`).
        numeric_values (`torch.FloatTensor` of shape `(B, T)`): value of each `<num>`, NaN elsewhere.
        attention_mask (`torch.Tensor` of shape `(B, T)`): 1 for real tokens, 0 for padding.
        inputs_embeds (`torch.FloatTensor` of shape `(B, T, D)`): token embeddings to use instead of
            `input_ids` (e.g. a species distribution times the embedding matrix).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("CrystalMLMModel needs input_ids or inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch, length = reference.shape
        if length > self.config.n_positions:
            raise ValueError(f"sequence length {length} exceeds n_positions={self.config.n_positions}")
        if position_ids is None:
            position_ids = torch.arange(length, device=reference.device).unsqueeze(0)
        hidden = self.embed(input_ids, numeric_values, inputs_embeds)
        hidden = self.drop(hidden + sinusoidal_positions(position_ids, self.config.n_embd).to(hidden.dtype))
        mask = padding_mask_4d(attention_mask)
        for block in self.h:
            hidden = block(hidden, mask)
        return BaseModelOutput(last_hidden_state=self.ln_f(hidden))


@dataclass
class CrystalMLMMaskedLMOutput(ModelOutput):
    """Outputs of :class:`CrystalMLMForMaskedLM`.

    loss: species cross-entropy + ``numeric_loss_weight`` × value NLL + ``position_mse_weight`` × MSE (with
    labels); species_loss / numeric_loss / position_mse are its parts. logits (B, T, V): token scores
    (only elements at ``<mask>`` positions). numeric_params (B, T, 3, M): raw mixture parameters of the
    clean value at each ``<num>`` (zeros elsewhere). numeric_kind_ids (B, T): kind index of the value at t
    (-1: none). predicted_values (B, T): differentiable point estimate of each value (NaN elsewhere).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    numeric_params: torch.Tensor | None = None
    numeric_kind_ids: torch.Tensor | None = None
    predicted_values: torch.Tensor | None = None
    species_loss: torch.Tensor | None = None
    numeric_loss: torch.Tensor | None = None
    position_mse: torch.Tensor | None = None


class CrystalMLMForMaskedLM(CrystalMLMPreTrainedModel):
    """CrystalMLM with a species head and a continuous value head: reconstructs masked, noisy crystals."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CrystalMLMConfig) -> None:
        super().__init__(config)
        self.transformer = CrystalMLMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kind_names, kind_of_token = kind_lookup(config)
        kinds = [DEFAULT_VALUE_KINDS[name] for name in kind_names] or [DEFAULT_VALUE_KINDS["scalar"]]
        self.numeric_head = NumericValueHead(config.n_embd, kinds, config.num_mixture_components)
        self.register_buffer("kind_of_token", kind_of_token, persistent=False)
        self.register_buffer("not_element", non_element_mask(config), persistent=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def value_kind_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Kind index (B, T) of the value at each ``<num>`` (the kind of the label before it), -1 elsewhere."""
        previous = F.pad(self.kind_of_token.to(input_ids.device)[input_ids[:, :-1]], (1, 0), value=NO_KIND)
        return torch.where(input_ids == self.config.num_token_id, previous, torch.full_like(previous, NO_KIND))

    def point_estimates(self, params: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        """Differentiable point estimate (B, T) of every value (NaN where ``kind_ids`` is -1)."""
        out = torch.full(kind_ids.shape, math.nan, dtype=torch.float32, device=params.device)
        for kind_id, kind in enumerate(self.numeric_head.kinds):
            rows = kind_ids == kind_id
            if bool(rows.any()):
                out = out.masked_scatter(rows, mixture_point_estimate(kind, params[rows]))
        return out

    def forward(
        self,
        input_ids: torch.LongTensor,
        numeric_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        numeric_labels: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CrystalMLMMaskedLMOutput:
        r"""
        Arguments as `CrystalMLMModel.forward`, plus:
        labels (`torch.LongTensor` of shape `(B, T)`): the clean token at each masked position, -100 elsewhere.
        numeric_labels (`torch.FloatTensor` of shape `(B, T)`): the clean value at each noised `<num>`,
            NaN elsewhere.
        """
        hidden = self.transformer(
            input_ids, numeric_values=numeric_values, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        logits = self.lm_head(hidden)
        at_mask = (input_ids == self.config.mask_token_id).unsqueeze(-1) & self.not_element
        logits = logits.masked_fill(at_mask, torch.finfo(logits.dtype).min)
        kind_ids = self.value_kind_ids(input_ids)
        params = self.numeric_head(hidden, kind_ids)
        predicted = self.point_estimates(params, kind_ids)
        species_loss = numeric_loss = position_mse = loss = None
        if labels is not None:
            species_loss = self._species_loss(logits, labels)
            loss = species_loss
        if numeric_labels is not None:
            numeric_loss, position_mse = self._value_losses(params, kind_ids, predicted, numeric_labels)
            value_loss = self.config.numeric_loss_weight * numeric_loss + self.config.position_mse_weight * position_mse
            loss = value_loss if loss is None else loss + value_loss
        return CrystalMLMMaskedLMOutput(
            loss=loss, logits=logits, numeric_params=params, numeric_kind_ids=kind_ids, predicted_values=predicted,
            species_loss=species_loss, numeric_loss=numeric_loss, position_mse=position_mse,
        )

    def _species_loss(self, logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """Mean cross-entropy over labelled positions (0 when none is labelled)."""
        labelled = labels != -100
        if not bool(labelled.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[labelled].float(), labels[labelled].to(logits.device))

    def _value_losses(
        self, params: torch.Tensor, kind_ids: torch.Tensor, predicted: torch.Tensor, numeric_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean value NLL and mean squared periodic error (fractional values only) over labelled values."""
        targets = numeric_labels.to(params.device).float()
        labelled = (kind_ids >= 0) & torch.isfinite(targets)
        zero = params.sum() * 0.0
        if not bool(labelled.any()):
            return zero, zero
        nll = -self.numeric_head.log_prob(params[labelled], kind_ids[labelled], targets[labelled]).mean()
        fractional = [i for i, kind in enumerate(self.numeric_head.kinds) if kind.family == "von_mises"]
        periodic = labelled & (kind_ids == fractional[0]) if fractional else torch.zeros_like(labelled)
        if not bool(periodic.any()):
            return nll, zero
        mse = periodic_difference(predicted[periodic], targets[periodic]).pow(2).mean()
        return nll, mse


class CrystalMLMForSequenceClassification(CrystalMLMPreTrainedModel):
    """CrystalMLM with a linear head on the mean state of the real tokens: classification or regression."""

    def __init__(self, config: CrystalMLMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = CrystalMLMModel(config)
        self.dropout = nn.Dropout(config.classifier_pdrop)
        self.score = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        numeric_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        Arguments as `CrystalMLMModel.forward`, plus:
        labels (`torch.Tensor` of shape `(B,)` or `(B, num_labels)`): class ids, or targets for regression.
        """
        hidden = self.transformer(
            input_ids, numeric_values=numeric_values, attention_mask=attention_mask,
            position_ids=position_ids, inputs_embeds=inputs_embeds,
        ).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = self.score(self.dropout(pooled))
        loss = sequence_classification_loss(logits, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


CrystalMLMConfig.register_for_auto_class()
CrystalMLMModel.register_for_auto_class("AutoModel")
CrystalMLMForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
CrystalMLMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "CrystalMLMForMaskedLM",
    "CrystalMLMForSequenceClassification",
    "CrystalMLMMaskedLMOutput",
    "CrystalMLMModel",
    "CrystalMLMPreTrainedModel",
    "mixture_point_estimate",
    "periodic_difference",
]
