"""What transformers expects of every model, checked on tiny WyckoffGPT, MatterGPT and CrystalMLM models.

Save/load, batching and padding equivalence, cache, greedy/sample/beam/assisted generation with values,
hidden states and attentions, ``return_dict=False``, the old cache keyword, resizing, gradient checkpointing,
``torch.export``, and the plain-config trap. Written for crystal-lm (not copied from transformers' tests).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from crystal_tokenizers.errors import MalformedSequenceError
from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from modeling import (
    CrystalMLMConfig,
    CrystalMLMForMaskedLM,
    CrystalMLMForSequenceClassification,
    CrystalMLMModel,
    GenerateNumericOutput,
    MatterGPTConfig,
    MatterGPTForCausalLM,
    MatterGPTForSequenceClassification,
    MatterGPTModel,
    WyckoffGPTConfig,
    WyckoffGPTForCausalLM,
    WyckoffGPTModel,
)
from modeling.generation import GenerateBeamNumericOutput

SIZES = dict(n_layer=2, n_embd=32, n_head=4, n_inner=64, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


def wyckoff_config(tokenizer: WyckoffTokenizer, **overrides) -> WyckoffGPTConfig:
    return WyckoffGPTConfig.from_tokenizer(tokenizer, **{**SIZES, "n_positions": 160, **overrides})


def mattergpt_config(**overrides) -> MatterGPTConfig:
    return MatterGPTConfig(**{**SIZES, "vocab_size": 40, "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2,
                              "pad_token_id": 0, "condition_dropout": 0.0, **overrides})


def mlm_config(tokenizer: WyckoffTokenizer, **overrides) -> CrystalMLMConfig:
    return CrystalMLMConfig.from_tokenizer(tokenizer, **{**SIZES, "n_positions": 160, **overrides})


def build(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config).eval()


@pytest.fixture(scope="module")
def wyckoff(tokenizer):
    return build(WyckoffGPTForCausalLM, wyckoff_config(tokenizer))


@pytest.fixture(scope="module")
def mattergpt():
    return build(MatterGPTForCausalLM, mattergpt_config())


@pytest.fixture(scope="module")
def mlm(tokenizer):
    return build(CrystalMLMForMaskedLM, mlm_config(tokenizer))


@pytest.fixture(scope="module")
def wyckoff_sample(tokenizer, wyckoff):
    """A grammar-valid sampled sequence with its values (ids (1, T), values (1, T))."""
    torch.manual_seed(3)
    out = wyckoff.generate(tokenizer.prompt_inputs(["<bos>"])["input_ids"], do_sample=True, max_new_tokens=40,
                           logits_processor=[tokenizer.grammar_processor()])
    return out.sequences, out.numeric_values


def inputs_for(model, sample, tokenizer) -> dict:
    """Forward keyword arguments of one model on a realistic batch of 2."""
    if isinstance(model, (MatterGPTForCausalLM, MatterGPTForSequenceClassification, MatterGPTModel)):
        ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "crystal_system": torch.tensor([0, 6]), "properties": torch.tensor([[-1.0], [0.5]])}
    ids, values = sample
    ids, values = ids.repeat(2, 1), values.repeat(2, 1)
    if isinstance(model, (CrystalMLMForMaskedLM, CrystalMLMForSequenceClassification, CrystalMLMModel)):
        elements = torch.isin(ids, torch.tensor(tokenizer.element_token_ids))
        ids = torch.where(elements & (torch.arange(ids.shape[1]) % 2 == 0), tokenizer.mask_token_id, ids)
    return {"input_ids": ids, "numeric_values": values}


def first_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


ALL_CLASSES = [
    (WyckoffGPTForCausalLM, "wyckoff"), (WyckoffGPTModel, "wyckoff"),
    (MatterGPTForCausalLM, "mattergpt"), (MatterGPTForSequenceClassification, "mattergpt"), (MatterGPTModel, "mattergpt"),
    (CrystalMLMForMaskedLM, "mlm"), (CrystalMLMForSequenceClassification, "mlm"), (CrystalMLMModel, "mlm"),
]


def config_of(kind: str, tokenizer, **overrides):
    return {"wyckoff": lambda: wyckoff_config(tokenizer, **overrides), "mattergpt": lambda: mattergpt_config(**overrides),
            "mlm": lambda: mlm_config(tokenizer, **overrides)}[kind]()


# ------------------------------------------------------------------------------------------------ save / load

@pytest.mark.parametrize("cls,kind", ALL_CLASSES, ids=[c.__name__ for c, _ in ALL_CLASSES])
def test_save_load_gives_identical_outputs(cls, kind, tokenizer, wyckoff_sample, tmp_path):
    model = build(cls, config_of(kind, tokenizer))
    kwargs = inputs_for(model, wyckoff_sample, tokenizer)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(first_output(model(**kwargs)), first_output(loaded(**kwargs)))


# ------------------------------------------------------------------------------------- batching and padding

@pytest.mark.parametrize("name", ["wyckoff", "mattergpt"])
def test_left_padded_batch_matches_each_sequence_alone(name, request, tokenizer, wyckoff_sample):
    model = request.getfixturevalue(name)
    kwargs = inputs_for(model, wyckoff_sample, tokenizer)
    ids = kwargs.pop("input_ids")[:1]
    values = kwargs.pop("numeric_values", None)
    short = ids[:, : ids.shape[1] - 4]
    pad = model.config.pad_token_id
    padded = torch.cat([torch.full((1, 4), pad), short], dim=1)
    batch = torch.cat([ids, padded])
    mask = torch.cat([torch.ones_like(ids), (padded != pad) | (torch.arange(padded.shape[1]) >= 4)]).long()
    extra = {}
    if values is not None:
        v = values[:1]
        extra["numeric_values"] = torch.cat([v, torch.cat([torch.full((1, 4), math.nan), v[:, : short.shape[1]]], 1)])
    if name == "mattergpt":
        extra.update(crystal_system=torch.tensor([3, 3]))
    with torch.no_grad():
        together = model(batch, attention_mask=mask, **extra).logits
        alone_long = model(ids, **{k: t[:1] for k, t in extra.items()}).logits
        alone_short = model(short, **{k: (t[1:, 4:] if t.dim() == 2 else t[1:]) for k, t in extra.items()}).logits
    torch.testing.assert_close(together[0], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1, 4:], alone_short[0], atol=1e-5, rtol=1e-5)


def test_masked_model_right_padding_matches_alone(mlm, tokenizer, wyckoff_sample):
    kwargs = inputs_for(mlm, wyckoff_sample, tokenizer)
    ids, values = kwargs["input_ids"][:1], kwargs["numeric_values"][:1]
    short, short_values = ids[:, :-5], values[:, :-5]
    batch = torch.cat([ids, torch.cat([short, torch.full((1, 5), tokenizer.pad_token_id)], 1)])
    batch_values = torch.cat([values, torch.cat([short_values, torch.full((1, 5), math.nan)], 1)])
    mask = torch.ones_like(batch)
    mask[1, -5:] = 0
    with torch.no_grad():
        together = mlm(batch, numeric_values=batch_values, attention_mask=mask)
        alone = mlm(short, numeric_values=short_values)
    torch.testing.assert_close(together.logits[1, :-5], alone.logits[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- cache

@pytest.mark.parametrize("name", ["wyckoff", "mattergpt"])
def test_incremental_decoding_with_cache_matches_full_forward(name, request, tokenizer, wyckoff_sample):
    model = request.getfixturevalue(name)
    kwargs = inputs_for(model, wyckoff_sample, tokenizer)
    ids, values = kwargs.pop("input_ids"), kwargs.pop("numeric_values", None)
    with torch.no_grad():
        full = model(ids, numeric_values=values, **kwargs).logits if values is not None else model(ids, **kwargs).logits
        split = ids.shape[1] - 3
        step_kwargs = dict(kwargs)
        if values is not None:
            step_kwargs["numeric_values"] = values[:, :split]
        first = model(ids[:, :split], use_cache=True, **step_kwargs)
        if values is not None:
            step_kwargs["numeric_values"] = values[:, split:]
        rest = model(ids[:, split:], cache=first.cache, use_cache=True, **step_kwargs)
    torch.testing.assert_close(rest.logits, full[:, split:], atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_and_without_cache_agree(wyckoff, tokenizer):
    prompt = tokenizer.prompt_inputs(["<bos>"])["input_ids"]
    runs = [wyckoff.generate(prompt, max_new_tokens=30, use_cache=use, logits_processor=[tokenizer.grammar_processor()])
            for use in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(runs[0].numeric_values, runs[1].numeric_values, equal_nan=True)


@pytest.mark.parametrize("name", ["wyckoff", "mattergpt"])
def test_old_cache_keyword_is_mapped_with_a_warning(name, request, tokenizer, wyckoff_sample):
    model = request.getfixturevalue(name)
    kwargs = inputs_for(model, wyckoff_sample, tokenizer)
    ids = kwargs.pop("input_ids")
    values = kwargs.pop("numeric_values", None)
    extra = dict(kwargs)
    with torch.no_grad():
        if values is not None:
            extra["numeric_values"] = values[:, :-1]
        first = model(ids[:, :-1], use_cache=True, **extra)
        if values is not None:
            extra["numeric_values"] = values[:, -1:]
        new = model(ids[:, -1:], cache=first.cache, use_cache=True, **extra).logits
        first = model(ids[:, :-1], use_cache=True, **{**extra, **({"numeric_values": values[:, :-1]} if values is not None else {})})
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = model(ids[:, -1:], past_key_values=first.cache, use_cache=True, **extra).logits
    torch.testing.assert_close(old, new)


# ------------------------------------------------------------------------------------------------ generation

def assert_values_are_the_heads_greedy_choice(model, sequences, values):
    """Teacher-forced check: each value is the head's greedy value given the prefix and the earlier values."""
    num = model.config.num_token_id
    assert torch.isfinite(values[sequences == num]).all() and torch.isnan(values[sequences != num]).all()
    with torch.no_grad():
        out = model(sequences, numeric_values=values)
    params, kinds = out.numeric_params[:, :-1], out.numeric_kind_ids[:, :-1]
    at = sequences[:, 1:] == num
    greedy = model.numeric_head.sample(params[at], kinds[at], greedy=True)
    assert int(at.sum()) > 0
    assert torch.allclose(greedy, values[:, 1:][at], atol=1e-4), "values do not belong to their sequences"


def test_beam_search_returns_the_values_of_the_returned_beams(wyckoff, tokenizer):
    prompt = tokenizer.prompt_inputs(["<bos>", "<bos>"])["input_ids"]
    out = wyckoff.generate(prompt, num_beams=3, num_return_sequences=2, max_new_tokens=24, output_scores=True,
                           logits_processor=[tokenizer.grammar_processor(), ])
    assert isinstance(out, GenerateBeamNumericOutput)
    assert out.sequences.shape[0] == 4 and out.sequences_scores.shape == (4,)
    assert out.beam_indices.shape[0] == 4 and out.numeric_values.shape == out.sequences.shape
    processor = tokenizer.grammar_processor()
    # values pass through the grammar's value mapping, so compare against that mapping of the greedy value
    num = wyckoff.config.num_token_id
    assert torch.isfinite(out.numeric_values[out.sequences == num]).all()
    unprocessed = wyckoff.generate(prompt, num_beams=3, num_return_sequences=2, max_new_tokens=24,
                                   logits_processor=[_TokensOnly(processor)])
    assert_values_are_the_heads_greedy_choice(wyckoff, unprocessed.sequences, unprocessed.numeric_values)


class _TokensOnly:
    """A grammar's token mask without its value mapping (so values are the head's own choice)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, input_ids, scores):
        return self.processor(input_ids, scores)


def test_greedy_values_are_the_heads_choice(wyckoff, tokenizer):
    prompt = tokenizer.prompt_inputs(["<bos>"])["input_ids"]
    out = wyckoff.generate(prompt, max_new_tokens=30, logits_processor=[_TokensOnly(tokenizer.grammar_processor())])
    assert_values_are_the_heads_greedy_choice(wyckoff, out.sequences, out.numeric_values)


def test_mattergpt_beam_search_and_scores(mattergpt):
    out = mattergpt.generate(torch.ones(2, 1, dtype=torch.long), crystal_system=torch.tensor([0, 1]), num_beams=3,
                             num_return_sequences=3, max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[0] == 6 and out.sequences_scores.shape == (6,)


def test_assisted_greedy_decoding_equals_plain_greedy(wyckoff, tokenizer):
    assistant = build(WyckoffGPTForCausalLM, wyckoff_config(tokenizer), seed=1)
    prompt = tokenizer.prompt_inputs(["<bos>"])["input_ids"]
    grammar = lambda: [_TokensOnly(tokenizer.grammar_processor())]  # noqa: E731
    plain = wyckoff.generate(prompt, max_new_tokens=30, logits_processor=grammar())
    assisted = wyckoff.generate(prompt, max_new_tokens=30, logits_processor=grammar(), assistant_model=assistant)
    assert torch.equal(plain.sequences, assisted.sequences)
    torch.testing.assert_close(plain.numeric_values, assisted.numeric_values, equal_nan=True)


def test_mattergpt_assisted_greedy_decoding_equals_plain_greedy(mattergpt):
    assistant = build(MatterGPTForCausalLM, mattergpt_config(), seed=1)
    prompt = torch.ones(1, 1, dtype=torch.long)
    plain = mattergpt.generate(prompt, max_new_tokens=12, do_sample=False)
    assisted = mattergpt.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(plain, assisted)


def test_generation_needs_a_prompt(wyckoff):
    with pytest.raises(ValueError, match="needs a prompt"):
        wyckoff.generate(max_new_tokens=3)


def test_default_generation_returns_values_and_bare_ids_say_how_to_decode(wyckoff, tokenizer):
    prompt = tokenizer.prompt_inputs(["<bos>"])["input_ids"]
    out = wyckoff.generate(prompt, max_new_tokens=20, logits_processor=[tokenizer.grammar_processor()])
    assert isinstance(out, GenerateNumericOutput) and out.numeric_values.shape == out.sequences.shape
    ids = wyckoff.generate(prompt, max_new_tokens=20, return_dict_in_generate=False,
                           logits_processor=[tokenizer.grammar_processor()])
    assert isinstance(ids, torch.Tensor)
    errors = tokenizer.decode_structures(ids)
    assert isinstance(errors[0], MalformedSequenceError) and "return_dict_in_generate" in str(errors[0])


def test_plain_gpt2_style_config_is_refused_with_the_fix(tokenizer):
    with pytest.raises(ValueError, match="from_tokenizer"):
        WyckoffGPTForCausalLM(WyckoffGPTConfig(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="from_tokenizer"):
        CrystalMLMForMaskedLM(CrystalMLMConfig(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2))


# -------------------------------------------------------------------------------------- hidden states, tuples

@pytest.mark.parametrize("cls,kind", ALL_CLASSES, ids=[c.__name__ for c, _ in ALL_CLASSES])
def test_hidden_states_and_attentions(cls, kind, tokenizer, wyckoff_sample):
    model = build(cls, config_of(kind, tokenizer, attn_implementation="eager"))
    kwargs = inputs_for(model, wyckoff_sample, tokenizer)
    batch, length = kwargs["input_ids"].shape
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True, output_attentions=True)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (batch, length, model.config.n_embd) for h in out.hidden_states)
    assert len(out.attentions) == layers
    assert all(a.shape == (batch, model.config.n_head, length, length) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(batch, model.config.n_head, length))
    with torch.no_grad():
        plain = model(**kwargs)
    assert getattr(plain, "hidden_states", None) is None and getattr(plain, "attentions", None) is None


def test_generate_returns_hidden_states(wyckoff, tokenizer):
    prompt = tokenizer.prompt_inputs(["<bos>"])["input_ids"]
    out = wyckoff.generate(prompt, max_new_tokens=5, output_hidden_states=True,
                           logits_processor=[tokenizer.grammar_processor()])
    assert len(out.hidden_states) == out.sequences.shape[1] - prompt.shape[1]
    assert len(out.hidden_states[0]) == wyckoff.config.n_layer + 1


@pytest.mark.parametrize("cls,kind", ALL_CLASSES, ids=[c.__name__ for c, _ in ALL_CLASSES])
def test_return_dict_false_gives_a_tuple(cls, kind, tokenizer, wyckoff_sample):
    model = build(cls, config_of(kind, tokenizer))
    kwargs = inputs_for(model, wyckoff_sample, tokenizer)
    with torch.no_grad():
        as_dict, as_tuple = model(**kwargs), model(**kwargs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], first_output(as_dict))


# -------------------------------------------------------------------------------------------------- resizing

def test_resize_then_forward_and_generate(tokenizer, wyckoff_sample):
    model = build(WyckoffGPTForCausalLM, wyckoff_config(tokenizer))
    ids, values = wyckoff_sample
    new_size = len(tokenizer) + 3
    model.resize_token_embeddings(new_size)
    assert model.kind_of_token.shape == (new_size,) and model.lm_head.weight.shape[0] == new_size
    with torch.no_grad():
        assert model(ids, numeric_values=values).logits.shape[-1] == new_size
    out = model.generate(ids[:, :1], max_new_tokens=6, logits_processor=[tokenizer.grammar_processor()])
    assert out.sequences.shape[1] == 7
    mlm = build(CrystalMLMForMaskedLM, mlm_config(tokenizer))
    mlm.resize_token_embeddings(new_size)
    assert mlm.not_element.shape == (new_size,)
    with torch.no_grad():
        assert mlm(ids, numeric_values=values).logits.shape[-1] == new_size


def test_resized_property_token_gets_its_value_kind(tokenizer):
    model = build(WyckoffGPTForCausalLM, wyckoff_config(tokenizer))
    new_id = len(tokenizer)
    model.config.numeric_kind_token_ids = {**model.config.numeric_kind_token_ids,
                                           "scalar": [*model.config.numeric_kind_token_ids["scalar"], new_id]}
    model.resize_token_embeddings(new_id + 1)
    assert int(model.kind_of_token[new_id]) == model.numeric_head.kinds.index(
        next(k for k in model.numeric_head.kinds if k.name == "scalar"))


# ---------------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("cls,kind", [ALL_CLASSES[0], ALL_CLASSES[2], ALL_CLASSES[5]],
                         ids=["WyckoffGPT", "MatterGPT", "CrystalMLM"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cls, kind, tokenizer, wyckoff_sample):
    kwargs = inputs_for(build(cls, config_of(kind, tokenizer)), wyckoff_sample, tokenizer)
    kwargs["labels"] = kwargs["input_ids"]
    if kind == "mlm":
        kwargs["numeric_labels"] = kwargs["numeric_values"]
    results = []
    for checkpointing in (False, True):
        model = build(cls, config_of(kind, tokenizer)).train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.is_activation_checkpointing
        loss = model(**kwargs).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ torch.export

@pytest.mark.parametrize("cls,kind", [ALL_CLASSES[0], ALL_CLASSES[2], ALL_CLASSES[5]],
                         ids=["WyckoffGPT", "MatterGPT", "CrystalMLM"])
def test_torch_export_of_forward(cls, kind, tokenizer, wyckoff_sample):
    model = build(cls, config_of(kind, tokenizer))
    kwargs = {**inputs_for(model, wyckoff_sample, tokenizer), "return_dict": False}
    if kind != "mlm":
        kwargs["use_cache"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, args=(), kwargs=kwargs, strict=False)
    with torch.no_grad():
        expected = model(**kwargs)[0]
    torch.testing.assert_close(exported.module()(**kwargs)[0], expected)
