"""Tests of the Wyckoff grammar LogitsProcessor: it admits real crystals and only produces decodable ones."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from crystal_tokenizers.wyckoff import codec
from crystal_tokenizers.wyckoff.grammar import (
    WyckoffGrammarLogitsProcessor,
    composition_reachable,
    min_atoms_to_place,
    parse_conditions,
)
from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS, crystal_system
from crystal_tokenizers.wyckoff.orbits import load_orbit_table
from modeling.configuration_wyckoff_gpt import WyckoffGPTConfig
from modeling.modeling_wyckoff_gpt import WyckoffGPTForCausalLM
from training.sampling import encode_prompts, generate_crystals

SAMPLE_CSV = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in pd.read_csv(SAMPLE_CSV)["cif"][:120]]


@pytest.fixture(scope="module")
def untrained_model(tokenizer: WyckoffTokenizer) -> WyckoffGPTForCausalLM:
    torch.manual_seed(0)
    config = WyckoffGPTConfig.from_tokenizer(tokenizer, n_layer=1, n_embd=32, n_head=2, n_inner=64)
    return WyckoffGPTForCausalLM(config).eval()


def _rejected_tokens(tokenizer: WyckoffTokenizer, texts: list[str]) -> list[tuple[int, str]]:
    """(row, token) pairs after ``<sep>`` (and the closing ``<eos>``) that the grammar would mask."""
    encoded = encode_prompts(tokenizer, texts)
    ids = torch.cat([encoded["input_ids"], torch.full((len(texts), 1), tokenizer.eos_token_id)], dim=1)
    sep_column = (ids == tokenizer.convert_tokens_to_ids(codec.SEP)).int().argmax(dim=1)
    processor = WyckoffGrammarLogitsProcessor(tokenizer)
    rejected = []
    for column in range(1, ids.shape[1]):
        scores = processor(ids[:, :column], torch.zeros(len(texts), len(tokenizer)))
        allowed = torch.isfinite(scores[torch.arange(len(texts)), ids[:, column]])
        for row in torch.nonzero(~allowed & (column > sep_column)).flatten().tolist():
            rejected.append((row, tokenizer.convert_ids_to_tokens(int(ids[row, column]))))
    return rejected


@pytest.mark.parametrize(
    "conditions",
    [{}, {"composition": True}, {"elements": True}, {"crystal_system": True, "space_group": True}],
    ids=["unconditioned", "composition", "elements", "symmetry"],
)
def test_grammar_admits_every_real_crystal(tokenizer, structures, conditions):
    texts = [tokenizer.structure_to_string(s, **conditions) for s in structures]
    assert _rejected_tokens(tokenizer, texts) == []


def test_grammar_rejects_foreign_orbit_and_premature_end(tokenizer):
    processor = WyckoffGrammarLogitsProcessor(tokenizer)
    prompt = encode_prompts(tokenizer, ["<sep> sg:225 Na"])["input_ids"]
    scores = processor(prompt, torch.zeros(1, len(tokenizer)))
    allowed = {tokenizer.convert_ids_to_tokens(i) for i in torch.nonzero(torch.isfinite(scores[0])).flatten().tolist()}
    fm3m = {p.token for p in load_orbit_table().positions[225]}
    assert allowed and allowed <= fm3m
    assert "wp:192l@225" not in allowed  # 192 atoms exceed the default cap of 80
    prompt = encode_prompts(tokenizer, ["<sep> sg:225"])["input_ids"]
    scores = processor(prompt, torch.zeros(1, len(tokenizer)))
    assert not math.isfinite(scores[0, tokenizer.convert_tokens_to_ids("<lat>")])
    assert not math.isfinite(scores[0, tokenizer.eos_token_id])


def test_fixed_orbit_used_once(tokenizer):
    processor = WyckoffGrammarLogitsProcessor(tokenizer)
    prompt = encode_prompts(tokenizer, ["<sep> sg:225 Na wp:4a@22 Na"])["input_ids"]
    scores = processor(prompt, torch.zeros(1, len(tokenizer)))
    assert not math.isfinite(scores[0, tokenizer.convert_tokens_to_ids("wp:4a@22")])
    assert math.isfinite(scores[0, tokenizer.convert_tokens_to_ids("wp:4b@22")])


def test_composition_reachability_is_exact():
    z = {"Na": 11, "Cl": 17, "K": 19}
    assert composition_reachable(225, -1, 0, ((z["Na"], 4), (z["Cl"], 4)))
    assert not composition_reachable(225, -1, 0, ((z["Na"], 1),))  # Fm-3m's smallest orbit has 4 sites
    assert composition_reachable(225, -1, 0, ((z["Na"], 8),))  # 8c, or 4a + 4b
    # only two 4-fold orbits (4a, 4b) exist: three elements with 4 atoms each cannot all be placed
    assert not composition_reachable(225, -1, 0, ((z["Na"], 4), (z["Cl"], 4), (z["K"], 4)))
    assert composition_reachable(221, -1, 0, ((z["Na"], 1), (z["Cl"], 1), (z["K"], 3)))
    assert min_atoms_to_place(225, -1, 0, (z["Na"], z["Cl"])) == 8
    assert min_atoms_to_place(225, -1, 0, (z["Na"], z["Cl"], z["K"])) == 16  # 4a + 4b + 8c


def test_parse_conditions_reads_prefix():
    parsed = parse_conditions(["cs:cubic", "<composition>", "Na", "n:4", "Cl", "n:4", "stab:low"])
    assert parsed.crystal_system == "cubic"
    assert parsed.composition == {"Na": 4, "Cl": 4}
    assert parsed.elements is None


@pytest.mark.slow
def test_untrained_model_samples_are_all_decodable(tokenizer, untrained_model):
    torch.manual_seed(1)
    samples = generate_crystals(untrained_model, tokenizer, ["<sep>"] * 1000, temperature=1.5, batch_size=125)
    errors = Counter(s.error.split(":")[0] for s in samples if s.error)
    assert len(samples) == 1000
    assert not errors, errors
    assert len({s.space_group for s in samples}) > 20  # many groups, not one easy group


def test_conditions_are_obeyed(tokenizer, untrained_model, structures):
    crystals = [codec.structure_to_crystal(s) for s in structures[:24]]
    prompts = [tokenizer.condition_prefix(composition=c.composition()) for c in crystals]
    prompts += [tokenizer.condition_prefix(elements=sorted(c.composition())) for c in crystals[:12]]
    prompts += [tokenizer.condition_prefix(crystal_system=name) for name in CRYSTAL_SYSTEMS]
    prompts += [tokenizer.condition_prefix(space_group=n) for n in (1, 12, 62, 166, 194, 225, 229)]
    torch.manual_seed(2)
    samples = generate_crystals(untrained_model, tokenizer, prompts, temperature=1.5, batch_size=64)
    assert all(s.structure is not None for s in samples), [s.error for s in samples if s.error]
    for crystal, sample in zip(crystals, samples[:24]):
        counts = {el.symbol: int(n) for el, n in sample.structure.composition.items()}
        assert counts == crystal.composition()
    for crystal, sample in zip(crystals, samples[24:36]):
        assert {el.symbol for el in sample.structure.composition} == set(crystal.composition())
    for name, sample in zip(CRYSTAL_SYSTEMS, samples[36:43]):
        assert crystal_system(sample.space_group) == name
    assert [s.space_group for s in samples[43:]] == [1, 12, 62, 166, 194, 225, 229]


def test_values_are_mapped_into_valid_domains(tokenizer):
    processor = WyckoffGrammarLogitsProcessor(tokenizer)
    # triclinic: alpha = beta = 60 degrees leaves gamma in (0, 120); a proposed 170 degrees is pulled inside
    text = "<sep> sg:1 Na wp:1a@1 <lat> a 4.0 b 4.0 c 4.0 alpha 60.0 beta 60.0 gamma 0.0"
    encoded = encode_prompts(tokenizer, [text])
    values = processor.process_numeric_values(encoded["input_ids"], encoded["numeric_values"], torch.tensor([170.0]))
    assert 0.0 < float(values[0]) <= 120.0 - 1.0
    # Pm-3m 6e (token wp:6f@195) is (x, 0, 0): x = 0 collapses it onto 1a, so the coordinate is moved off 0
    text = "<sep> sg:221 Na wp:6f@195 <lat> a 4.0 x 0.0"
    encoded = encode_prompts(tokenizer, [text])
    values = processor.process_numeric_values(encoded["input_ids"], encoded["numeric_values"], torch.tensor([0.0]))
    x = float(values[0])
    assert 0.0 < x < 0.01
    crystal = tokenizer.string_to_structure(f"<sep> sg:221 Na wp:6f@195 <lat> a 4.0 x {x:.6f}")
    assert len(crystal) == 6
