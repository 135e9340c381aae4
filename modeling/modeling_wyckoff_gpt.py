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
from torch import nn
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import Cache
from transformers.generation.candidate_generator import AssistedCandidateGenerator
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_wyckoff_gpt import WyckoffGPTConfig
from .generation import (
    GenerateBeamNumericOutput,
    GenerateNumericOutput,
    NumericCandidateGenerator,
    NumericGenerationState,
    NumericValuesProcessor,
    mask_to_num_tokens,
    pad_values,
)
from .layers import CrystalPreTrainedModel
from .numeric import (
    add_value_embeddings,
    kind_lookup,
    numeric_head_from_config,
    require_numeric_tokens,
    value_embedding_from_config,
)

logger = logging.getLogger(__name__)


@dataclass
class WyckoffGPTCausalLMOutput(ModelOutput):
    """Outputs of :class:`WyckoffGPTForCausalLM`.

    loss: cross-entropy + ``numeric_loss_weight`` × value NLL (with ``labels``); token_loss / numeric_loss
    are its parts. logits (B, T, V): next-token scores. numeric_params (B, T, 3, M): raw mixture
    parameters of the value after position t (zeros where the token at t is not a value label).
    numeric_kind_ids (B, T): the kind index at t (-1: none). hidden_states / attentions: per layer, when asked.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    numeric_params: torch.Tensor | None = None
    numeric_kind_ids: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    numeric_loss: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class WyckoffGPTPreTrainedModel(CrystalPreTrainedModel):
    """Weight initialisation (GPT-2 scheme) and the ``from_pretrained`` plumbing."""

    config_class = WyckoffGPTConfig
    config: WyckoffGPTConfig


class WyckoffGPTModel(WyckoffGPTPreTrainedModel):
    """Token + value + sinusoidal position embeddings and ``n_layer`` blocks; returns (B, T, D) states."""

    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__(config)
        self.add_token_body(config)
        self.value_embedding = value_embedding_from_config(config)
        self.post_init()

    def embed(self, input_ids: torch.LongTensor, numeric_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings plus value embeddings at ``<num>`` positions with a finite value."""
        embeddings = self.wte(input_ids)
        values = None if numeric_values is None else numeric_values.to(embeddings.device)
        return add_value_embeddings(embeddings, values, input_ids == self.config.num_token_id, self.value_embedding)

    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        output_hidden_states / output_attentions / return_dict: as in every transformers model (attention
            weights need `attn_implementation="eager"`).
        """
        cache, position_ids = self.cache_and_positions(input_ids, attention_mask, position_ids, cache, use_cache)
        hidden = self.embed(input_ids, numeric_values)
        hidden = self.drop(hidden + self.wpe(position_ids).to(hidden.dtype))
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache)
        for block in self.h:
            hidden = block(hidden, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden), cache=cache)


class WyckoffGPTForCausalLM(WyckoffGPTPreTrainedModel, GenerationMixin):
    """WyckoffGPT with a token head and a continuous value head; ``generate`` samples values too."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _keys_to_ignore_on_load_unexpected = [r"kind_of_token"]  # a vocabulary table, rebuilt from the config

    def __init__(self, config: WyckoffGPTConfig) -> None:
        require_numeric_tokens(config, type(self).__name__)
        super().__init__(config)
        self.transformer = WyckoffGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.numeric_head = numeric_head_from_config(config)
        self.register_buffer("kind_of_token", kind_lookup(config)[1], persistent=False)
        self.generation_config.return_dict_in_generate = True
        self.post_init()

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """The value kind of each token id, -1 for none (from ``config.numeric_kind_token_ids``)."""
        return {"kind_of_token": kind_lookup(self.config)[1]}

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        Extra keyword arguments (e.g. `num_items_in_batch`) go to the loss function.
        """
        outputs = self.transformer(
            input_ids, numeric_values=numeric_values, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, **kwargs,
        )
        hidden, ids = outputs.last_hidden_state, input_ids
        if logits_to_keep > 0:
            hidden, ids = hidden[:, -logits_to_keep:], ids[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        kind_ids = self.kind_of_token[ids]
        params = self.numeric_head(hidden, kind_ids)
        loss = token_loss = numeric_loss = None
        if labels is not None:
            token_loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            numeric_loss = self.numeric_nll(params, kind_ids, input_ids, numeric_values, labels)
            loss = token_loss + self.config.numeric_loss_weight * numeric_loss
        return WyckoffGPTCausalLMOutput(
            loss=loss, logits=logits, numeric_params=params, numeric_kind_ids=kind_ids, token_loss=token_loss,
            numeric_loss=numeric_loss, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
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

        ``numeric_values`` (B, T) are the prompt's values (NaN elsewhere; default all NaN). Values are drawn
        with the generation ``temperature`` when ``do_sample``, else the heaviest component's mode; logits
        processors that implement ``process_numeric_values`` also map each drawn value. Greedy, sampling,
        beam search (values of the returned beams, with ``beam_indices`` / ``sequences_scores``) and assisted
        decoding are supported. The default generation config returns a dict: a
        :class:`~modeling.generation.GenerateNumericOutput` (``GenerateBeamNumericOutput`` for beams) whose
        ``numeric_values`` align with ``sequences``; with ``return_dict_in_generate=False`` only token ids come
        back and the values are lost (a crystal cannot be decoded from them).
        """
        kwargs.pop("numeric_state", None)  # an assistant's call receives the main model's keyword arguments
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("WyckoffGPTForCausalLM.generate needs a prompt: pass input_ids (at least <bos>).")
        config = generation_config if generation_config is not None else self.generation_config
        setting = lambda name: kwargs.get(name, getattr(config, name))  # noqa: E731
        num_beams = setting("num_beams") or 1
        if num_beams > 1 and setting("use_cache") is False:
            raise ValueError("WyckoffGPT beam search needs use_cache=True: the sampled values follow the beams "
                             "through the cache reorder.")
        wants_dict = bool(setting("return_dict_in_generate"))
        if numeric_values is None:
            numeric_values = torch.full(input_ids.shape, math.nan, device=input_ids.device)
        if numeric_values.shape != input_ids.shape:
            raise ValueError(f"numeric_values {tuple(numeric_values.shape)} must match input_ids {tuple(input_ids.shape)}")
        temperature = setting("temperature")
        state = NumericGenerationState(
            num_token_id=self.config.num_token_id, sampler=self._sample_values, do_sample=bool(setting("do_sample")),
            temperature=float(temperature) if temperature is not None else 1.0,
            processors=tuple(p for p in (logits_processor or ()) if isinstance(p, NumericValuesProcessor)),
            log_draws=num_beams > 1,
        )
        if setting("use_cache") is not False and kwargs.get("cache") is None:
            kwargs["cache"] = DynamicCache(config=self.config)
        if kwargs.get("cache") is not None:
            kwargs["cache"].numeric_state = state  # so that a beam reorder reaches the record
        output = super().generate(
            input_ids, generation_config=generation_config, logits_processor=logits_processor,
            numeric_values=numeric_values.float(), numeric_state=state,
            **{**kwargs, "return_dict_in_generate": True},
        )
        if isinstance(output, GenerateBeamDecoderOnlyOutput):
            prompt = numeric_values.float().repeat_interleave(num_beams, dim=0)
            values = state.beam_values(output.sequences, output.beam_indices, prompt)
            result = GenerateBeamNumericOutput(**dict(output.items()), numeric_values=values)
        else:
            result = GenerateNumericOutput(**dict(output.items()), numeric_values=state.finish(output.sequences))
        return result if wants_dict else result.sequences

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 *args, **kwargs):
        """Assisted decoding: the assistant's draft stops before its first ``<num>`` (the values are ours)."""
        generator = super()._get_candidate_generator(
            generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, *args, **kwargs
        )
        state = model_kwargs.get("numeric_state")
        if state is None:
            return generator
        if type(generator) is not AssistedCandidateGenerator:
            raise ValueError(f"{type(self).__name__} supports assisted decoding with an assistant model of the same "
                             f"vocabulary only (got {type(generator).__name__}): a draft must not invent values.")
        return NumericCandidateGenerator(generator, state)

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
            numeric_state.extend(input_ids)
            values = numeric_state.values
        if values is not None:
            fed = model_inputs["input_ids"].shape[1]
            values = pad_values(values, input_ids.shape[1])[:, -fed:]
            model_inputs["numeric_values"] = mask_to_num_tokens(input_ids[:, -fed:], values, self.config.num_token_id)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, *args, **kwargs) -> dict:
        """Usual update, plus the value drawn for each row's next token (used if it is a ``<num>``)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        state = model_kwargs.get("numeric_state")
        if state is not None and outputs.numeric_params is not None:
            state.after_forward(outputs.numeric_params, outputs.numeric_kind_ids, kwargs.get("num_new_tokens", 1))
        return model_kwargs

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search: reorder the cache and the record of sampled values with it."""
        cache.reorder_cache(beam_idx)
        state = getattr(cache, "numeric_state", None)
        if state is not None:
            state.reorder(beam_idx)
        return cache


WyckoffGPTConfig.register_for_auto_class()
WyckoffGPTModel.register_for_auto_class("AutoModel")
WyckoffGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "WyckoffGPTCausalLMOutput",
    "WyckoffGPTForCausalLM",
    "WyckoffGPTModel",
    "WyckoffGPTPreTrainedModel",
]
