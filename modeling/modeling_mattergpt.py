"""MatterGPT: a GPT decoder conditioned on crystal system and scalar properties (SLICES-PLUS paper).

Architecture (``config.dual_flow=True``, the paper's "two separate workflows")::

    h      = dropout(token_embedding + position_embedding)                      (B, T, D)
    x_cs   = h + crystal_system_embedding(crystal_system)[:, None]               condition added at every position
    x_prop = h + property_embedding(properties, property_mask)[:, None]
    y_cs   = LayerNorm(blocks_cs(x_cs))      n_layer causal blocks
    y_prop = LayerNorm(blocks_prop(x_prop))  n_layer causal blocks
    hidden = Linear(2D -> D)(concat(y_cs, y_prop))
    logits = lm_head(hidden)                 tied to the token embedding unless tie_word_embeddings=False

With ``dual_flow=False`` a single stack receives ``h + e_cs + e_prop``. A condition enters its flow as a
vector added to the input of every position, so the KV cache needs no special handling: the
condition is re-supplied with each forward call (``generate`` forwards ``crystal_system``,
``properties`` and ``property_mask`` and repeats them for ``num_return_sequences``).

Conditions and "no condition": a crystal-system id of -1 (or ``crystal_system=None``) selects a
learned null embedding; a property whose mask is 0 (or ``properties=None``) selects that property's
learned null embedding. During training each condition is replaced by its null, independently per
example, with probability ``config.condition_dropout``, so one model generates with all, some
(Con-CDVAE's "partial" strategy) or none of the conditions.

Property embedding (``property_embedding="gaussian"``, after Con-CDVAE): the value ``v`` (data units) is
standardised, ``z = (v - mean) / std`` with the config's statistics, expanded on ``num_gaussians``
Gaussians ``exp(-(z - mu_k)^2 / (2 w^2))`` with centres ``mu_k`` evenly spaced on
``[-gaussian_range, gaussian_range]`` and width ``w`` their spacing, then mapped linearly to ``D``
(one map per property); the per-property vectors are summed. ``"linear"`` maps ``z`` itself.
"""

import logging

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import capture_outputs

from .configuration_mattergpt import MatterGPTConfig
from .layers import (
    CrystalPreTrainedModel,
    TransformerBlock,
    sequence_classification_loss,
)

logger = logging.getLogger(__name__)

NO_CRYSTAL_SYSTEM = -1


def crystal_system_ids(crystal_system: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Crystal-system ids as a (B,) LongTensor, -1 meaning unconditioned (also for ``None``)."""
    if crystal_system is None:
        return torch.full((batch_size,), NO_CRYSTAL_SYSTEM, dtype=torch.long, device=device)
    ids = torch.as_tensor(crystal_system, device=device).long().reshape(-1)
    if ids.shape[0] != batch_size:
        raise ValueError(f"crystal_system has {ids.shape[0]} entries for a batch of {batch_size} sequences.")
    return ids


def property_values_and_mask(
    properties: torch.Tensor | None,
    property_mask: torch.Tensor | None,
    batch_size: int,
    num_properties: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Property values (B, P) float and mask (B, P) bool; missing mask means "every finite value is set"."""
    if properties is None:
        shape = (batch_size, num_properties)
        return torch.zeros(shape, device=device), torch.zeros(shape, dtype=torch.bool, device=device)
    values = torch.as_tensor(properties, device=device).float().reshape(batch_size, -1)
    if values.shape[1] != num_properties:
        raise ValueError(f"properties has {values.shape[1]} columns, the model conditions on {num_properties} properties.")
    mask = torch.isfinite(values)
    if property_mask is not None:
        mask = mask & torch.as_tensor(property_mask, device=device).bool().reshape(batch_size, num_properties)
    return torch.where(mask, values, torch.zeros_like(values)), mask


def drop_conditions(
    crystal_system: torch.Tensor, property_mask: torch.Tensor, probability: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each condition by "no condition" with ``probability``, independently per example and property."""
    drop_cs = torch.rand(crystal_system.shape, device=crystal_system.device) < probability
    drop_prop = torch.rand(property_mask.shape, device=property_mask.device) < probability
    return torch.where(drop_cs, NO_CRYSTAL_SYSTEM, crystal_system), property_mask & ~drop_prop


def gaussian_basis(z: torch.Tensor, num_gaussians: int, value_range: float) -> torch.Tensor:
    """Expand standardised values (..., ) on evenly spaced Gaussians over [-range, range] -> (..., K)."""
    centres = torch.linspace(-value_range, value_range, num_gaussians, device=z.device, dtype=z.dtype)
    width = 2.0 * value_range / max(num_gaussians - 1, 1)
    return torch.exp(-0.5 * ((z.unsqueeze(-1) - centres) / width) ** 2)


def last_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor:
    """Index (B,) of the rightmost real token, from the attention mask, else the pad id, else the last one."""
    length = input_ids.shape[-1]
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), length - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(length, device=input_ids.device)
    return (positions * real.long()).argmax(-1)


class MatterGPTFlow(nn.Module):
    """One stack of ``n_layer`` blocks and its final LayerNorm; cache layers start at ``first_layer_idx``."""

    def __init__(self, config: MatterGPTConfig, first_layer_idx: int) -> None:
        super().__init__()
        self.h = nn.ModuleList(TransformerBlock(config, first_layer_idx + i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        for block in self.h:
            x = block(x, mask, cache)
        return self.ln_f(x)


class MatterGPTCrystalSystemEmbedding(nn.Module):
    """Crystal-system id -> (B, D); row ``num_crystal_systems`` is the learned "no condition"."""

    def __init__(self, config: MatterGPTConfig) -> None:
        super().__init__()
        self.num_crystal_systems = config.num_crystal_systems
        self.embedding = nn.Embedding(config.num_crystal_systems + 1, config.n_embd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not is_torchdynamo_compiling() and bool(((ids >= self.num_crystal_systems) | (ids < NO_CRYSTAL_SYSTEM)).any()):
            raise ValueError(
                f"crystal_system ids must be in [0, {self.num_crystal_systems}) or -1, got {ids.tolist()}."
            )
        return self.embedding(torch.where(ids < 0, self.num_crystal_systems, ids))


class MatterGPTPropertyEmbedding(nn.Module):
    """Property values (B, P) in data units + mask -> (B, D): per-property embedding summed over P.

    The standardisation statistics (``means``, ``stds``, data units) are buffers saved with the weights, and
    loading a state with more properties grows the module first: an adapter that adds conditions (PEFT
    ``modules_to_save``) then loads onto the base model it was trained from, as ``PeftModel.from_pretrained``
    does it.
    """

    def __init__(self, config: MatterGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.gaussian = config.property_embedding == "gaussian"
        self.num_gaussians = config.num_gaussians
        self.gaussian_range = config.gaussian_range
        self.in_features = config.num_gaussians if self.gaussian else 1
        self._allocate(config.num_properties)
        for name, value in self.constant_buffers().items():
            self.register_buffer(name, value)

    def _allocate(self, num_properties: int) -> None:
        width = self.config.n_embd
        self.weight = nn.Parameter(torch.empty(num_properties, self.in_features, width))
        self.bias = nn.Parameter(torch.empty(num_properties, width))
        self.null = nn.Parameter(torch.empty(num_properties, width))

    @property
    def num_properties(self) -> int:
        return self.weight.shape[0]

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """The config's standardisation statistics (data units)."""
        return {"means": torch.tensor([float(m) for m in self.config.property_means]),
                "stds": torch.tensor([float(s) for s in self.config.property_stds])}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        incoming = state_dict.get(prefix + "weight")
        if incoming is not None and incoming.shape[0] > self.num_properties:
            device = self.weight.device
            self._allocate(incoming.shape[0])
            self.to(device)
            for name in ("means", "stds"):
                self.register_buffer(name, torch.zeros(incoming.shape[0], device=device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def values_and_mask(
        self, properties: torch.Tensor | None, property_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (B, P) and mask (B, P) for this module's P properties (see :func:`property_values_and_mask`)."""
        return property_values_and_mask(properties, property_mask, batch_size, self.num_properties, self.weight.device)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = (values - self.means) / self.stds
        features = gaussian_basis(z, self.num_gaussians, self.gaussian_range) if self.gaussian else z.unsqueeze(-1)
        features = features.to(self.weight.dtype)
        per_property = torch.einsum("bpk,pkd->bpd", features, self.weight) + self.bias
        per_property = torch.where(mask.unsqueeze(-1), per_property, self.null)
        return per_property.sum(dim=1)


class MatterGPTPreTrainedModel(CrystalPreTrainedModel):
    """Weight initialisation (GPT-2 scheme, residual depth = blocks per flow) and the ``from_pretrained`` plumbing."""

    config_class = MatterGPTConfig
    config: MatterGPTConfig

    def _init_weights(self, module: nn.Module) -> None:
        """The shared scheme, plus the property embedding's per-property maps and null vectors."""
        super()._init_weights(module)
        if isinstance(module, MatterGPTPropertyEmbedding):
            std = self.config.initializer_range
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
            init.normal_(module.null, mean=0.0, std=std)


class MatterGPTModel(MatterGPTPreTrainedModel):
    """Token + position embeddings, condition embeddings and one or two flows; returns (B, T, D) states."""

    def __init__(self, config: MatterGPTConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.crystal_system_embedding = MatterGPTCrystalSystemEmbedding(config)
        self.property_embedding = MatterGPTPropertyEmbedding(config)
        self.flows = nn.ModuleList(MatterGPTFlow(config, i * config.n_layer) for i in range(config.num_flows))
        self.merge = nn.Linear(2 * config.n_embd, config.n_embd) if config.dual_flow else None
        self.gradient_checkpointing = False
        self.post_init()

    def condition_embeddings(
        self,
        batch_size: int,
        crystal_system: torch.Tensor | None = None,
        properties: torch.Tensor | None = None,
        property_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) crystal-system and property embeddings, with condition dropout in training mode."""
        ids = crystal_system_ids(crystal_system, batch_size, self.wte.weight.device)
        values, mask = self.property_embedding.values_and_mask(properties, property_mask, batch_size)
        if self.training and self.config.condition_dropout > 0:
            ids, mask = drop_conditions(ids, mask, self.config.condition_dropout)
        return self.crystal_system_embedding(ids), self.property_embedding(values, mask)

    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor,
        crystal_system: torch.LongTensor | None = None,
        properties: torch.FloatTensor | None = None,
        property_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (only the new ones when `cache` is given).
        crystal_system (`torch.LongTensor` of shape `(B,)`): 0-6 (see the config), -1 or `None` = unconditioned.
        properties (`torch.FloatTensor` of shape `(B, P)`): property values in data units (eV/atom, eV, GPa).
        property_mask (`torch.Tensor` of shape `(B, P)`): 1 where the property conditions, 0 = unconditioned.
        attention_mask (`torch.Tensor` of shape `(B, past + T)`): 1 for real tokens, 0 for padding.
        cache (`Cache`): key/value cache (a `DynamicCache` is created when `use_cache` and none is given).
        output_hidden_states / output_attentions / return_dict: as in every transformers model (hidden states
            of both flows, the crystal-system flow first; attention weights need `attn_implementation="eager"`).
        """
        cache, position_ids = self.cache_and_positions(input_ids, attention_mask, position_ids, cache, use_cache)
        batch_size = input_ids.shape[0]
        hidden = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache)
        cs_embedding, prop_embedding = self.condition_embeddings(
            batch_size, crystal_system, properties, property_mask
        )
        if self.merge is None:
            out = self.flows[0](hidden + (cs_embedding + prop_embedding).unsqueeze(1), mask, cache)
        else:
            cs_flow, prop_flow = self.flows
            out = self.merge(
                torch.cat(
                    [
                        cs_flow(hidden + cs_embedding.unsqueeze(1), mask, cache),
                        prop_flow(hidden + prop_embedding.unsqueeze(1), mask, cache),
                    ],
                    dim=-1,
                )
            )
        return BaseModelOutputWithPast(last_hidden_state=out, cache=cache)


class MatterGPTForCausalLM(MatterGPTPreTrainedModel, GenerationMixin):
    """MatterGPT with a language-modelling head; ``generate`` accepts the condition kwargs."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MatterGPTConfig) -> None:
        super().__init__(config)
        self.transformer = MatterGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor,
        crystal_system: torch.LongTensor | None = None,
        properties: torch.FloatTensor | None = None,
        property_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Arguments as `MatterGPTModel.forward`, plus:
        labels (`torch.LongTensor` of shape `(B, T)`): next-token targets, shifted inside; -100 is ignored.
        logits_to_keep (`int`): if > 0, compute logits for the last `logits_to_keep` positions only.
        Extra keyword arguments (e.g. `num_items_in_batch`) go to the loss function.
        """
        outputs = self.transformer(
            input_ids,
            crystal_system=crystal_system,
            properties=properties,
            property_mask=property_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class MatterGPTForSequenceClassification(MatterGPTPreTrainedModel):
    """MatterGPT with a linear head on the last real token: classification or (``num_labels=1``) regression."""

    def __init__(self, config: MatterGPTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = MatterGPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        crystal_system: torch.LongTensor | None = None,
        properties: torch.FloatTensor | None = None,
        property_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        r"""
        Arguments as `MatterGPTModel.forward`, plus:
        labels (`torch.Tensor` of shape `(B,)` or `(B, num_labels)`): class ids (long) or targets (float,
            regression in the target's units).
        Extra keyword arguments (e.g. the Trainer's `num_items_in_batch`) are accepted and ignored.
        """
        outputs = self.transformer(
            input_ids,
            crystal_system=crystal_system,
            properties=properties,
            property_mask=property_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        pooled = logits[torch.arange(input_ids.shape[0], device=logits.device), last]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


MatterGPTModel.register_for_auto_class("AutoModel")
MatterGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MatterGPTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "MatterGPTForCausalLM",
    "MatterGPTForSequenceClassification",
    "MatterGPTModel",
    "MatterGPTPreTrainedModel",
]
