"""Chemistry-aware inpainting: orbit multiplicities, SMACT re-ranking and the species baselines, on real crystals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure

from crystal_tokenizers import WyckoffTokenizer
from training.chemistry import (
    MaskContext,
    chemistry_ranker,
    completed_counts,
    cooccurrence_baseline,
    element_statistics,
    is_charge_neutral,
    model_ranker,
    most_frequent_baseline,
    orbit_multiplicity,
    smact_baseline,
)

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def token_lists(tokenizer) -> list[list[str]]:
    table = pd.read_csv(SAMPLE).head(60)
    out = []
    for cif in table["cif"]:
        text = tokenizer.structure_to_string(Structure.from_str(cif, fmt="cif"))
        out.append(tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]))
    return out


def _masked(tokens: list[str], orbits: list[int], tied: bool) -> MaskContext:
    from crystal_tokenizers.wyckoff.masking import element_positions

    positions = [element_positions(tokens)[k] for k in orbits]
    damaged = ["<mask>" if i in positions else t for i, t in enumerate(tokens)]
    return MaskContext(tuple(damaged), tuple(positions), tied)


def test_multiplicities_rebuild_the_composition_of_real_crystals(tokenizer, token_lists):
    table = pd.read_csv(SAMPLE).head(60)
    for tokens, cif in zip(token_lists, table["cif"]):
        context = _masked(tokens, [0], tied=False)
        original = tokens[context.masked_positions[0]]
        counts = completed_counts(context, [original])
        composition = Structure.from_str(cif, fmt="cif").composition
        assert {e: n / sum(counts.values()) for e, n in counts.items()} == pytest.approx(
            {str(e): a / composition.num_atoms for e, a in composition.element_composition.items()})
    assert orbit_multiplicity("wp:48h@225") == 48
    with pytest.raises(ValueError, match="not a Wyckoff"):
        orbit_multiplicity("Fe")


def test_charge_neutrality_is_smact():
    assert is_charge_neutral(Counter({"Na": 4, "Cl": 4}))
    assert not is_charge_neutral(Counter({"Na": 4, "O": 4, "F": 4}))


def test_chemistry_ranker_puts_neutral_fills_first():
    # antifluorite Li2O (Fm-3m, Li on 8c, O on 4a) with the O orbit masked; the model prefers F, then Cl
    # (Li2F, Li2Cl: not charge-neutral), then O, then S; Li (present) is excluded for a tied mask
    tokens = ("<bos>", "sg:225", "<mask>", "wp:4a@22", "Li", "wp:8c@22", "<lat>", "a", "<num>", "<eos>")
    context = MaskContext(tokens, (2,), tied=True)
    elements = ["F", "Cl", "O", "S", "Li"]
    log_probs = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    assert model_ranker(context, log_probs, elements, 1)[0][1] == ("F",)
    ranked = chemistry_ranker(pool=5)(context, log_probs, elements, 4)
    assert [species for _, species in ranked] == [("O",), ("S",), ("F",), ("Cl",)]
    assert ranked[0][0] == pytest.approx(np.log(0.15))
    soft = chemistry_ranker(pool=5, penalty=0.5)(context, log_probs, elements, 4)
    assert [species for _, species in soft] == [("F",), ("Cl",), ("O",), ("S",)], "ln .4 - .5 > ln .3 - .5 > ln .15 > ln .1"
    assert soft[0][0] == pytest.approx(np.log(0.4) - 0.5)


def test_baselines_fill_every_masked_orbit(token_lists):
    frequency, pairs = element_statistics(token_lists)
    assert frequency.most_common(1)[0][0] == "O"
    rankers = [most_frequent_baseline(frequency), cooccurrence_baseline(frequency, pairs), smact_baseline(frequency)]
    neutral = 0
    for tokens in token_lists[:20]:
        context = _masked(tokens, [0], tied=True)
        present = set(context.known_counts())
        for ranker in rankers:
            (_, assignment), = ranker(context, np.zeros((1, 1)), ["O"], 1)
            assert len(assignment) == 1 and assignment[0] not in present
        (_, smact_fill), = rankers[2](context, np.zeros((1, 1)), ["O"], 1)
        neutral += is_charge_neutral(completed_counts(context, smact_fill))
    assert neutral >= 18


def test_inpaint_chemistry_option_and_fill_mask_rerank(tokenizer):
    import torch
    from transformers import pipeline

    from modeling import CrystalMLMConfig, CrystalMLMForMaskedLM
    from training.inpaint import chemistry_fill_mask, inpaint

    torch.manual_seed(0)
    model = CrystalMLMForMaskedLM(CrystalMLMConfig.from_tokenizer(
        tokenizer, n_layer=1, n_embd=32, n_head=2, n_inner=64, num_mixture_components=2)).eval()
    structures = [Structure.from_str(c, fmt="cif") for c in pd.read_csv(SAMPLE)["cif"].head(12)]
    with_oxygen = [s for s in structures if "O" in s.composition.chemical_system.split("-")][:4]
    plain = inpaint(with_oxygen, model, tokenizer, mask_element="O", top_k=3)
    chem = inpaint(with_oxygen, model, tokenizer, mask_element="O", top_k=3, chemistry=True)
    from training.evaluate import is_compositionally_valid
    neutral_plain = sum(is_compositionally_valid(r.completions[0].structure.composition) for r in plain if r.completions)
    neutral_chem = sum(is_compositionally_valid(r.completions[0].structure.composition) for r in chem if r.completions)
    assert all(r.error is None and r.completions for r in chem)
    assert neutral_chem >= neutral_plain
    for result, structure in zip(chem, with_oxygen):
        present = {str(e) for e in structure.composition.elements} - {"O"}
        assert all(c.species[0] not in present for c in result.completions), "a tied mask takes an absent element"
    words = tokenizer.structure_to_string(with_oxygen[0]).split()
    words = ["<mask>" if w == "O" and words[i + 1].startswith("wp:") else w for i, w in enumerate(words[:-1])] + words[-1:]
    text = " ".join(words)
    answers = pipeline("fill-mask", model=model, tokenizer=tokenizer)(text, top_k=6)
    ranked = chemistry_fill_mask(text, answers, top_k=4, tied=True)
    assert 1 <= len(ranked) <= 4
    flags = [r["charge_neutral"] for r in ranked]
    assert flags == sorted(flags, reverse=True), "charge-neutral completions come first"
    assert all(r["sequence"].count("<mask>") == 0 for r in ranked)
