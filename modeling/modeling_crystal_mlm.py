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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_crystal_mlm import CrystalMLMConfig
from .layers import CrystalPreTrainedModel, check_positions, sequence_classification_loss
from .numeric import (
    NO_KIND,
    add_value_embeddings,
    kind_lookup,
    numeric_head_from_config,
    require_numeric_tokens,
    value_embedding_from_config,
)

logger = logging.getLogger(__name__)


def periodic_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` of fractional coordinates wrapped to [-0.5, 0.5) (minimum image)."""
    return torch.remainder(a - b + 0.5, 1.0) - 0.5


def non_element_mask(config: CrystalMLMConfig) -> torch.Tensor:
    """(vocab_size,) boolean tensor, True for every token that is not an element."""
    mask = torch.ones(config.vocab_size, dtype=torch.bool)
    mask[torch.as_tensor(config.element_token_ids, dtype=torch.long)] = False
    return mask


class CrystalMLMPreTrainedModel(CrystalPreTrainedModel):
    """Weight initialisation (GPT-2 scheme) and the ``from_pretrained`` plumbing."""

    config_class = CrystalMLMConfig
    config: CrystalMLMConfig


class CrystalMLMModel(CrystalMLMPreTrainedModel):
    """Token (or given) + value + sinusoidal position embeddings and ``n_layer`` bidirectional blocks."""

    def __init__(self, config: CrystalMLMConfig) -> None:
        super().__init__(config)
        config.validate_crystal_mlm()
        self.add_token_body(config, is_causal=False)
        self.value_embedding = value_embedding_from_config(config)
        self.post_init()

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
        at_num = torch.ones_like(values, dtype=torch.bool) if input_ids is None else input_ids == self.config.num_token_id
        return add_value_embeddings(embeddings, values, at_num, self.value_embedding)

    @capture_outputs
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
        if position_ids is None:
            position_ids = torch.arange(reference.shape[1], device=reference.device).unsqueeze(0)
        check_positions(position_ids, self.config.n_positions)
        hidden = self.embed(input_ids, numeric_values, inputs_embeds)
        hidden = self.drop(hidden + self.wpe(position_ids).to(hidden.dtype))
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
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
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class CrystalMLMForMaskedLM(CrystalMLMPreTrainedModel):
    """CrystalMLM with a species head and a continuous value head: reconstructs masked, noisy crystals."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CrystalMLMConfig) -> None:
        require_numeric_tokens(config, type(self).__name__)
        super().__init__(config)
        self.transformer = CrystalMLMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.numeric_head = numeric_head_from_config(config)
        for name, value in self.constant_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.post_init()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """Value kind of each token id (-1: none) and the non-element tokens (from the config)."""
        return {"kind_of_token": kind_lookup(self.config)[1], "not_element": non_element_mask(self.config)}

    def value_kind_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Kind index (B, T) of the value at each ``<num>`` (the kind of the label before it), -1 elsewhere."""
        previous = F.pad(self.kind_of_token.to(input_ids.device)[input_ids[:, :-1]], (1, 0), value=NO_KIND)
        return torch.where(input_ids == self.config.num_token_id, previous, torch.full_like(previous, NO_KIND))

    @can_return_tuple
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
        outputs = self.transformer(
            input_ids, numeric_values=numeric_values, attention_mask=attention_mask, position_ids=position_ids,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden)
        at_mask = (input_ids == self.config.mask_token_id).unsqueeze(-1) & self.not_element
        logits = logits.masked_fill(at_mask, torch.finfo(logits.dtype).min)
        kind_ids = self.value_kind_ids(input_ids)
        params = self.numeric_head(hidden, kind_ids)
        predicted = self.numeric_head.point_estimate(params, kind_ids)
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
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
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

    @can_return_tuple
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
        outputs = self.transformer(
            input_ids, numeric_values=numeric_values, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, **kwargs,
        )
        hidden = outputs.last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits = self.score(self.dropout(pooled))
        loss = sequence_classification_loss(logits, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


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
    "periodic_difference",
]
