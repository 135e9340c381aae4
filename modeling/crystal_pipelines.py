"""``pipeline("text-generation")`` and ``pipeline("fill-mask")`` for the crystal models: answers are crystals.

A saved WyckoffGPT / MatterGPT folder names :class:`CrystalTextGenerationPipeline`, and a CrystalMLM folder
:class:`CrystalFillMaskPipeline`, in the ``custom_pipelines`` entry of its ``config.json`` (written by
``CrystalPreTrainedModel.save_pretrained``, which also copies this file beside the model code), so that
``pipeline(task, model=folder, trust_remote_code=True)`` builds them from the folder alone. In-process, pass
``pipeline_class=`` with a model object.

The tokenizer comes from the pipeline machinery and is used through its public methods only (duck typing
on ``crystal_tokenizers.protocol``): ``condition_prefix`` / ``prompt_inputs`` (conditions as prompt text,
Wyckoff), ``ids_to_text`` (the crystal text, with the ``<num>`` values for Wyckoff),
``decode_structures`` and ``grammar_processor``. This module imports neither ``crystal_tokenizers`` nor
pymatgen: a decoded ``Structure`` is the tokenizer's object, written as CIF by its own ``to`` method.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import FillMaskPipeline, GenerationConfig, Pipeline

from .generation import property_condition_tensors

logger = logging.getLogger(__name__)

CRYSTAL_SYSTEMS: tuple[str, ...] = (
    "cubic", "hexagonal", "trigonal", "tetragonal", "orthorhombic", "monoclinic", "triclinic",
)
"""MatterGPT crystal-system ids 0-6 (the package-wide order, ``crystal_tokenizers.CRYSTAL_SYSTEMS``)."""
TEXT_CONDITIONS = ("crystal_system", "space_group", "elements", "composition", "stability", "properties")
"""Conditions a prompt tokenizer (Wyckoff) writes as prompt text (``tokenizer.condition_prefix``)."""
TENSOR_CONDITIONS = ("crystal_system", "properties")
"""Conditions a MatterGPT takes as ``generate`` keyword arguments."""


class CrystalPipelineError(ValueError):
    """A pipeline request the model cannot serve (the message names the argument and the reason)."""


def custom_pipelines_entry(auto_classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ``config.custom_pipelines`` value for a model family with these Auto classes (``{}`` if none fits)."""
    entries = {}
    if "AutoModelForCausalLM" in auto_classes:
        entries["text-generation"] = {"impl": f"{__name__.split('.')[-1]}.{CrystalTextGenerationPipeline.__name__}",
                                      "pt": ["AutoModelForCausalLM"], "type": "text"}
    if "AutoModelForMaskedLM" in auto_classes:
        entries["fill-mask"] = {"impl": f"{__name__.split('.')[-1]}.{CrystalFillMaskPipeline.__name__}",
                                "pt": ["AutoModelForMaskedLM"], "type": "text"}
    return entries


def _crystal_answer(decoded: Any) -> dict[str, Any]:
    """``structure``, ``cif`` and ``error`` of one decode result (a ``Structure`` or the decode error)."""
    if isinstance(decoded, Exception):
        return {"structure": None, "cif": None, "error": f"{type(decoded).__name__}: {decoded}"}
    return {"structure": decoded, "cif": decoded.to(fmt="cif"), "error": None}


def _sequence_text(tokenizer: Any, input_ids: Sequence[int], numeric_values: Sequence[float] | None) -> str | None:
    """The tokenizer's crystal text of one sequence (with its values), or ``None`` when it has none."""
    try:
        if numeric_values is None:
            return tokenizer.ids_to_text(input_ids)
        return tokenizer.ids_to_text(input_ids, numeric_values)
    except ValueError as err:  # the tokenizer's MalformedSequenceError
        logger.debug("no text for a generated sequence: %s", err)
        return None


def _condition_tensors(
    config: Any, crystal_system: str | int | None, properties: Mapping[str, float] | None
) -> dict[str, torch.Tensor]:
    """MatterGPT keyword arguments (batch 1) for a crystal system (name or id 0-6) and property targets (data units)."""
    kwargs: dict[str, torch.Tensor] = {}
    if crystal_system is not None:
        if isinstance(crystal_system, str):
            if crystal_system not in CRYSTAL_SYSTEMS:
                raise CrystalPipelineError(f"crystal_system {crystal_system!r} is not one of {CRYSTAL_SYSTEMS}")
            crystal_system = CRYSTAL_SYSTEMS.index(crystal_system)
        if not 0 <= int(crystal_system) < config.num_crystal_systems:
            raise CrystalPipelineError(
                f"crystal_system id {crystal_system} is outside [0, {config.num_crystal_systems})")
        kwargs["crystal_system"] = torch.tensor([int(crystal_system)])
    if properties:
        try:
            kwargs["properties"], kwargs["property_mask"] = property_condition_tensors(
                config.property_names, properties, 1)
        except ValueError as err:
            raise CrystalPipelineError(str(err)) from None
    return kwargs


class CrystalTextGenerationPipeline(Pipeline):
    """Samples crystals from a WyckoffGPT or a MatterGPT; every sample comes back decoded.

    Input: prompt text (``""`` for none; a Wyckoff prompt continues the condition prefix, a SLICES prompt is
    the start of a string). Conditions are keywords: for a Wyckoff model those of
    ``tokenizer.condition_prefix`` (``crystal_system``, ``space_group``, ``elements``, ``composition``,
    ``stability``, ``properties``) become the prompt's prefix; a MatterGPT takes ``crystal_system`` (name or
    id) and ``properties`` (``{name: value}``, the model's units) as tensors. ``grammar`` (default ``True``,
    as ``crystal-lm generate``) adds the tokenizer's grammar processor; generation keywords
    (``num_return_sequences``, ``max_new_tokens``, ``do_sample``, ``temperature``, ...) go to ``generate``.
    No ``<eos>`` is appended to the prompt; sequences end by ``n_positions``.

    Each sample is a dict: ``generated_text`` (the whole crystal text, values written out, as
    ``tokenizer.string_to_structure`` / ``crystal-lm decode`` read it; ``None`` if the sequence has none),
    ``structure`` (the decoded ``Structure`` or ``None``), ``cif`` (its CIF text or ``None``) and ``error``
    (the decode error's type and message, or ``None``).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(do_sample=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer.padding_side = "left"  # batched prompts end where generation starts

    @property
    def _uses_prompt_conditions(self) -> bool:
        """Whether the tokenizer writes conditions as prompt text (Wyckoff) rather than tensors (MatterGPT)."""
        return hasattr(self.tokenizer, "condition_prefix")

    def _sanitize_parameters(self, grammar: bool | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        given = {name: kwargs.pop(name) for name in TEXT_CONDITIONS if name in kwargs}
        conditions = {name: value for name, value in given.items() if value is not None}
        allowed = TEXT_CONDITIONS if self._uses_prompt_conditions else TENSOR_CONDITIONS
        refused = sorted(set(conditions) - set(allowed))
        if refused:
            raise CrystalPipelineError(
                f"{type(self.model).__name__} takes the conditions {list(allowed)}, not {refused}")
        forward = dict(kwargs)
        if grammar is not None:
            forward["grammar"] = grammar
        return ({"conditions": conditions} if conditions else {}), forward, {}

    def preprocess(self, prompt: str, conditions: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``<bos>`` + prompt ids (no ``<eos>``), with ``numeric_values`` (Wyckoff) or condition tensors (MatterGPT)."""
        if not isinstance(prompt, str):
            raise CrystalPipelineError(f"a prompt must be text, got {type(prompt).__name__}")
        conditions = dict(conditions or {})
        if self._uses_prompt_conditions:
            if conditions or not prompt.strip():
                prompt = f"{self.tokenizer.condition_prefix(**conditions)} {prompt}".strip()
            inputs = dict(self.tokenizer.prompt_inputs([prompt]))
        else:
            ids = [self.tokenizer.bos_token_id] + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            inputs.update(_condition_tensors(
                self.model.config, conditions.get("crystal_system"), conditions.get("properties")))
        return inputs

    def _forward(self, model_inputs: dict[str, Any], grammar: bool = True, **generate_kwargs: Any) -> dict[str, Any]:
        input_ids = model_inputs.pop("input_ids")
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, return_dict_in_generate=True)
        prompt_length = input_ids.shape[1]
        room = self.model.config.n_positions - prompt_length
        if room < 1:
            raise CrystalPipelineError(f"the prompt has {prompt_length} tokens, no room left in n_positions="
                                       f"{self.model.config.n_positions}")
        requested = self._get_set_generation_params(generate_kwargs)
        new_tokens = requested.get("max_new_tokens") or (requested.get("max_length") or math.inf) - prompt_length
        generate_kwargs.pop("max_length", None)
        generate_kwargs["max_new_tokens"] = int(min(room, new_tokens))
        processors = list(generate_kwargs.pop("logits_processor", None) or [])
        if grammar:
            max_length = prompt_length + generate_kwargs["max_new_tokens"]
            processors.append(self.tokenizer.grammar_processor(max_length=max_length))
        output = self.model.generate(
            input_ids=input_ids, logits_processor=processors, **model_inputs, **generate_kwargs)
        rows = input_ids.shape[0]
        shape = (rows, output.sequences.shape[0] // rows, output.sequences.shape[1])
        outputs = {"sequences": output.sequences.reshape(shape)}
        if getattr(output, "numeric_values", None) is not None:
            outputs["numeric_values"] = output.numeric_values.reshape(shape)
        return outputs

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        sequences = model_outputs["sequences"][0]
        values = model_outputs.get("numeric_values")
        if values is not None:
            values = values[0]
            decoded = self.tokenizer.decode_structures(sequences, values)
            rows = zip(sequences.tolist(), values.tolist())
        else:
            decoded = self.tokenizer.decode_structures(sequences)
            rows = ((ids, None) for ids in sequences.tolist())
        texts = [_sequence_text(self.tokenizer, ids, vals) for ids, vals in rows]
        return [{"generated_text": text, **_crystal_answer(item)} for text, item in zip(texts, decoded)]


class CrystalFillMaskPipeline(FillMaskPipeline):
    """``fill-mask`` for CrystalMLM: each candidate's ``sequence`` keeps every value and decodes to a crystal.

    Input: a Wyckoff crystal text with values, element tokens replaced by ``<mask>``. Per mask, the ``top_k``
    candidates (``score``, ``token``, ``token_str``) as in transformers; ``sequence`` is the crystal text with
    that candidate at its mask and the top prediction at every other mask (so it decodes), values as given;
    ``structure`` / ``cif`` / ``error`` are that sequence's decode (see :class:`CrystalTextGenerationPipeline`).
    One mask gives a flat list, several a list per mask.
    """

    def _forward(self, model_inputs: dict[str, Any]) -> Any:
        model_outputs = super()._forward(model_inputs)
        model_outputs["numeric_values"] = model_inputs["numeric_values"]
        return model_outputs

    def postprocess(self, model_outputs: Any, top_k: int = 5, target_ids: Any = None) -> list:
        input_ids = model_outputs["input_ids"][0]
        values = model_outputs["numeric_values"][0].tolist()
        masked = torch.nonzero(input_ids == self.tokenizer.mask_token_id, as_tuple=False).squeeze(-1)
        probs = model_outputs["logits"][0, masked, :].float().softmax(dim=-1)
        if target_ids is not None:
            probs = probs[..., torch.as_tensor(target_ids)]
            top_k = min(top_k, probs.shape[-1])
        scores, candidates = probs.topk(top_k)
        if target_ids is not None:
            candidates = torch.as_tensor(target_ids)[candidates]
        best = input_ids.clone()
        best[masked] = candidates[:, 0]
        result = []
        for site, (site_scores, site_candidates) in enumerate(zip(scores.tolist(), candidates.tolist())):
            row = []
            for score, token in zip(site_scores, site_candidates):
                filled = best.clone()
                filled[masked[site]] = token
                keep = filled != self.tokenizer.pad_token_id
                ids, vals = filled[keep].tolist(), [v for v, k in zip(values, keep.tolist()) if k]
                row.append({"score": score, "token": token, "token_str": self.tokenizer.convert_ids_to_tokens(token),
                            "sequence": _sequence_text(self.tokenizer, ids, vals),
                            **_crystal_answer(self.tokenizer.decode_structures([ids], [vals])[0])})
            result.append(row)
        return result[0] if len(result) == 1 else result


__all__ = [
    "CRYSTAL_SYSTEMS",
    "CrystalFillMaskPipeline",
    "CrystalPipelineError",
    "CrystalTextGenerationPipeline",
    "custom_pipelines_entry",
]
