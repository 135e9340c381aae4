"""WyckoffGPT: a GPT over Wyckoff token sequences with a discrete and a continuous head (Matra-Genoa).

Architecture (De Breuck et al. 2025)::

    e_t    = token_embedding(id_t) + [id_t == <num>] * value_embedding(v_t) + sinusoid(position_t)
    h      = LayerNorm(blocks(dropout(e)))          pre-LayerNorm blocks, GELU MLPs, SDPA attention
    logits = lm_head(h)                             next token (tied to the token embedding)
    params = numeric_head(h_t, kind(id_t))          mixture of the value of the <num> at t + 1

The kind of the value predicted at t is the kind of the label token at t (``config.numeric_kind_token_ids``);
:mod:`modeling.numeric` holds the value embedding and the per-kind mixtures (von Mises for fractional
coordinates, log-normal for lengths, clipped Gaussian for angles, Gaussian for scalars).
Loss = cross-entropy + ``numeric_loss_weight`` × mean negative log-likelihood of the values.

Generation: ``generate()`` is the ordinary ``GenerationMixin.generate`` with one addition: when a
``<num>`` is emitted its value is drawn from the continuous head of the previous step (with the
generation temperature; greedy decoding takes the heaviest component's mode), passed through any
logits processor that also implements ``process_numeric_values`` (e.g. the Wyckoff grammar), stored,
and embedded at the next step. With ``return_dict_in_generate=True`` the output carries
``numeric_values`` aligned with ``sequences``. The record of values is a per-call object passed as a
model keyword (:class:`modeling.generation.NumericGenerationState`), never state on the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from modeling.configuration_wyckoff_gpt import WyckoffGPTConfig
from modeling.generation import (
    GenerateNumericOutput,
    NumericGenerationState,
    NumericValuesProcessor,
    mask_to_num_tokens,
    pad_values,
)
from modeling.layers import CausalBlock, CausalSelfAttention, FeedForward
from modeling.numeric import (
    DEFAULT_VALUE_KINDS,
    NO_KIND,
    GaussianValueEmbedding,
    NumericValueHead,
)

logger = logging.getLogger(__name__)


def sinusoidal_positions(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal position encodings (..., dim) for integer positions (...)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=position_ids.device) / half)
    angles = position_ids.float().unsqueeze(-1) * frequencies
    encoding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(encoding, (0, dim - 2 * half))


def attention_mask_4d(attention_mask: torch.Tensor | None, query_length: int, past_length: int) -> torch.Tensor | None:
    """Boolean (B|1, 1, Tq, Tk) mask, True where a query may attend; ``None`` when plain causal suffices.

    A query always sees itself, so a padded query has a non-empty row (an empty row gives NaN in SDPA).
    """
    key_length = past_length + query_length
    has_padding = attention_mask is not None and not bool(attention_mask[:, -key_length:].all())
    if not has_padding and (past_length == 0 or query_length == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(past_length, key_length, device=device).unsqueeze(-1)
    key_pos = torch.arange(key_length, device=device).unsqueeze(0)
    allowed = (key_pos <= query_pos)[None, None]
    if has_padding:
        allowed = (allowed & attention_mask[:, None, None, -key_length:].bool()) | (key_pos == query_pos)
    return allowed


def default_position_ids(attention_mask: torch.Tensor | None, query_length: int, past_length: int) -> torch.Tensor:
    """Positions of the current tokens, counted over real tokens when a padding mask is given (left padding)."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length).unsqueeze(0)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -query_length:]


@dataclass
class WyckoffGPTCausalLMOutput(ModelOutput):
    """Outputs of :class:`WyckoffGPTForCausalLM`.

    loss: cross-entropy + ``numeric_loss_weight`` × value NLL (with ``labels``); token_loss / numeric_loss
    are its parts. logits (B, T, V): next-token scores. numeric_params (B, T, 3, M): raw mixture
    parameters of the value after position t (zeros where the token at t is not a value label).
    numeric_kind_ids (B, T): the kind index at t (-1: none).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    numeric_params: torch.Tensor | None = None
    numeric_kind_ids: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    numeric_loss: torch.Tensor | None = None
    cache: Cache | None = None


class WyckoffGPTPreTrainedModel(PreTrainedModel):
    """Weight initialisation (GPT-2 scheme) and the ``from_pretrained`` plumbing."""

    config_class = WyckoffGPTConfig
    config: WyckoffGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CausalBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights; residual projections scaled by 1/sqrt(2 n_layer)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (CausalSelfAttention, FeedForward)):
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        if isinstance(module, GaussianValueEmbedding):  # constant buffers: rebuilt, never learned
            linear_centres, log_centres = module.centre_grids()
            init.copy_(module.linear_centres, linear_centres)
            init.copy_(module.log_centres, log_centres)
        if isinstance(module, WyckoffGPTForCausalLM):
            init.copy_(module.kind_of_token, kind_lookup(self.config)[1])


class WyckoffGPTModel(WyckoffGPTPreTrainedModel):
    """Token + value + sinusoidal position embeddings and ``n_layer`` blocks; returns (B, T, D) states."""

    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.value_embedding = GaussianValueEmbedding(
            config.n_embd, linear_ranges=config.value_linear_ranges, num_linear=config.value_num_linear,
            log_range=config.value_log_range, num_log=config.value_num_log,
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(CausalBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def embed(self, input_ids: torch.LongTensor, numeric_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings plus value embeddings at ``<num>`` positions with a finite value."""
        embeddings = self.wte(input_ids)
        if numeric_values is None:
            return embeddings
        values = numeric_values.to(embeddings.device)
        has_value = (input_ids == self.config.num_token_id) & torch.isfinite(values)
        if not bool(has_value.any()):
            return embeddings
        safe = torch.where(has_value, values, torch.zeros_like(values))
        return embeddings + self.value_embedding(safe) * has_value.unsqueeze(-1).to(embeddings.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor,
        numeric_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, T)`): token ids (only the new ones when `cache` is given).
        numeric_values (`torch.FloatTensor` of shape `(B, T)`): value of each `<num>`, NaN elsewhere.
        attention_mask (`torch.Tensor` of shape `(B, past + T)`): 1 for real tokens, 0 for padding.
        cache (`Cache`): key/value cache (a `DynamicCache` is created when `use_cache` and none is given).
        """
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        length = input_ids.shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, length, past_length).to(input_ids.device)
        if int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(f"Sequence position {int(position_ids.max())} exceeds n_positions={self.config.n_positions}.")
        hidden = self.embed(input_ids, numeric_values)
        hidden = self.drop(hidden + sinusoidal_positions(position_ids, self.config.n_embd).to(hidden.dtype))
        mask = attention_mask_4d(attention_mask, length, past_length)
        for block in self.h:
            hidden = block(hidden, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden), cache=cache if use_cache else None)


def kind_lookup(config: WyckoffGPTConfig) -> tuple[tuple[str, ...], torch.Tensor]:
    """Kind names (in head order) and a (vocab_size,) tensor mapping each token id to its kind index or -1."""
    unknown = sorted(set(config.numeric_kind_token_ids) - set(DEFAULT_VALUE_KINDS))
    if unknown:
        raise ValueError(f"numeric_kind_token_ids has unknown kinds {unknown}; known: {sorted(DEFAULT_VALUE_KINDS)}")
    names = tuple(name for name in DEFAULT_VALUE_KINDS if name in config.numeric_kind_token_ids)
    table = torch.full((config.vocab_size,), NO_KIND, dtype=torch.long)
    for index, name in enumerate(names):
        table[torch.as_tensor(config.numeric_kind_token_ids[name], dtype=torch.long)] = index
    return names, table


class WyckoffGPTForCausalLM(WyckoffGPTPreTrainedModel, GenerationMixin):
    """WyckoffGPT with a token head and a continuous value head; ``generate`` samples values too."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__(config)
        self.transformer = WyckoffGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kind_names, kind_of_token = kind_lookup(config)
        kinds = [DEFAULT_VALUE_KINDS[name] for name in kind_names] or [DEFAULT_VALUE_KINDS["scalar"]]
        self.numeric_head = NumericValueHead(config.n_embd, kinds, config.num_mixture_components)
        self.register_buffer("kind_of_token", kind_of_token)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        numeric_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> WyckoffGPTCausalLMOutput:
        r"""
        Arguments as `WyckoffGPTModel.forward`, plus:
        labels (`torch.LongTensor` of shape `(B, T)`): next-token targets, shifted inside; -100 is ignored
            (for tokens and for the value that follows them).
        logits_to_keep (`int`): if > 0, compute both heads for the last `logits_to_keep` positions only.
        """
        outputs = self.transformer(
            input_ids, numeric_values=numeric_values, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache,
        )
        hidden, ids = outputs.last_hidden_state, input_ids
        if logits_to_keep > 0:
            hidden, ids = hidden[:, -logits_to_keep:], ids[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        kind_ids = self.kind_of_token.to(ids.device)[ids]
        params = self.numeric_head(hidden, kind_ids)
        loss = token_loss = numeric_loss = None
        if labels is not None:
            token_loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            numeric_loss = self.numeric_nll(params, kind_ids, input_ids, numeric_values, labels)
            loss = token_loss + self.config.numeric_loss_weight * numeric_loss
        return WyckoffGPTCausalLMOutput(
            loss=loss, logits=logits, numeric_params=params, numeric_kind_ids=kind_ids,
            token_loss=token_loss, numeric_loss=numeric_loss, cache=outputs.cache,
        )

    def numeric_nll(
        self,
        params: torch.Tensor,
        kind_ids: torch.Tensor,
        input_ids: torch.LongTensor,
        numeric_values: torch.Tensor | None,
        labels: torch.LongTensor,
    ) -> torch.Tensor:
        """Mean negative log-likelihood of the values that follow value labels (0 when there are none)."""
        if numeric_values is None or params.shape[1] != input_ids.shape[1]:
            return params.sum() * 0.0
        targets = numeric_values[:, 1:].to(params.device)
        valid = (
            (kind_ids[:, :-1] >= 0)
            & (input_ids[:, 1:] == self.config.num_token_id)
            & (labels[:, 1:] != -100)
            & torch.isfinite(targets)
        )
        if not bool(valid.any()):
            return params.sum() * 0.0
        log_prob = self.numeric_head.log_prob(params[:, :-1][valid], kind_ids[:, :-1][valid], targets[valid])
        return -log_prob.mean()

    # ------------------------------------------------------------------ generation
    def _sample_values(self, params: torch.Tensor, kind_ids: torch.Tensor, temperature: float, greedy: bool) -> torch.Tensor:
        return self.numeric_head.sample(params, kind_ids, temperature=temperature, greedy=greedy)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor=None,
        numeric_values: torch.Tensor | None = None,
        **kwargs,
    ):
        """``GenerationMixin.generate`` that also samples the value of every emitted ``<num>``.

        ``numeric_values`` (B, T) are the prompt's values (NaN elsewhere; default all NaN). Values are
        drawn with the generation ``temperature`` when ``do_sample``, else the heaviest component's mode.
        Logits processors that implement ``process_numeric_values`` also map each drawn value.
        Returns what ``GenerationMixin.generate`` returns; with ``return_dict_in_generate=True`` a
        :class:`~modeling.generation.GenerateNumericOutput` whose ``numeric_values`` align with ``sequences``.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("WyckoffGPTForCausalLM.generate needs a prompt: pass input_ids (at least <bos>).")
        config = generation_config if generation_config is not None else self.generation_config
        do_sample = bool(kwargs.get("do_sample", config.do_sample))
        temperature = kwargs.get("temperature", config.temperature)
        if numeric_values is None:
            numeric_values = torch.full(input_ids.shape, math.nan, device=input_ids.device)
        if numeric_values.shape != input_ids.shape:
            raise ValueError(f"numeric_values {tuple(numeric_values.shape)} must match input_ids {tuple(input_ids.shape)}")
        processors = tuple(p for p in (logits_processor or ()) if isinstance(p, NumericValuesProcessor))
        state = NumericGenerationState(
            num_token_id=self.config.num_token_id, do_sample=do_sample,
            temperature=float(temperature) if temperature is not None else 1.0, processors=processors,
        )
        output = super().generate(
            input_ids, generation_config=generation_config, logits_processor=logits_processor,
            numeric_values=numeric_values.float(), numeric_state=state, **kwargs,
        )
        sequences = output.sequences if isinstance(output, ModelOutput) else output
        state.extend(sequences, self._sample_values)
        values = mask_to_num_tokens(sequences, pad_values(state.values, sequences.shape[1]), self.config.num_token_id)
        if not isinstance(output, ModelOutput):
            return output
        return GenerateNumericOutput(**{key: value for key, value in output.items()}, numeric_values=values)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        numeric_values: torch.Tensor | None = None,
        numeric_state: NumericGenerationState | None = None,
        **kwargs,
    ) -> dict:
        """Slice inputs as usual and add the ``numeric_values`` of the tokens fed to the model.

        The value of a ``<num>`` emitted at the previous step is drawn here (from ``numeric_state``).
        """
        model_inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)
        if numeric_state is None:
            values = numeric_values
        else:
            if numeric_state.values is None:
                numeric_state.values = numeric_values.float()
            numeric_state.extend(input_ids, self._sample_values)
            values = numeric_state.values
        if values is not None:
            values = mask_to_num_tokens(input_ids, pad_values(values, input_ids.shape[1]), self.config.num_token_id)
            model_inputs["numeric_values"] = values[:, -model_inputs["input_ids"].shape[1]:]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        """Usual update, plus the continuous-head output at the last position for the next ``<num>``."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        state = model_kwargs.get("numeric_state")
        if state is not None and outputs.numeric_params is not None:
            state.pending_params = outputs.numeric_params[:, -1]
            state.pending_kinds = outputs.numeric_kind_ids[:, -1]
        return model_kwargs


WyckoffGPTConfig.register_for_auto_class()
WyckoffGPTModel.register_for_auto_class("AutoModel")
WyckoffGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "WyckoffGPTCausalLMOutput",
    "WyckoffGPTForCausalLM",
    "WyckoffGPTModel",
    "WyckoffGPTPreTrainedModel",
    "sinusoidal_positions",
]
