"""Chemistry-aware inpainting: orbit multiplicities, SMACT re-ranking and the species baselines, on real crystals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure

from crystal_tokenizers import WyckoffTokenizer
from crystal_tokenizers.wyckoff.statistics import ElementStatistics
from training.chemistry import (
    DEFAULT_PENALTY,
    STRICT_PENALTY,
    ChemistryPenalty,
    MaskContext,
    chemistry_ranker,
    completed_counts,
    cooccurrence_baseline,
    is_charge_neutral,
    model_ranker,
    most_frequent_baseline,
    orbit_multiplicity,
    ranker_for_mode,
    smact_baseline,
    smact_flags,
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
    assert smact_flags(Counter({"Li": 8, "F": 4})) == (False, False), "no oxidation states balance Li2F"
    assert smact_flags(Counter({"Na": 3, "Cl": 1})) == (True, False), "Na3Cl balances only as Na(-1) Cl(+3)"
    assert smact_flags(Counter({"Co": 24, "O": 32})) == (True, False), "spinel Co3O4 balances only as Co(II)Co(III)2"
    assert ChemistryPenalty(unbalanced=5.0, other=1.0).of(Counter({"Na": 3, "Cl": 1})) == 1.0
    assert ChemistryPenalty(unbalanced=5.0, other=1.0).of(Counter({"Li": 8, "F": 4})) == 5.0
    assert DEFAULT_PENALTY.of(Counter({"Na": 4, "Cl": 4})) == 0.0


def test_strict_and_soft_ranking_of_a_toy_oxide():
    # antifluorite Li2O (Fm-3m, Li on 8c, O on 4a) with the O orbit masked; the model prefers F, then Cl
    # (Li2F, Li2Cl: not charge-neutral), then O, then S; Li (present) is excluded for a tied mask
    tokens = ("<bos>", "sg:225", "<mask>", "wp:4a@22", "Li", "wp:8c@22", "<lat>", "a", "<num>", "<eos>")
    context = MaskContext(tokens, (2,), tied=True)
    elements = ["F", "Cl", "O", "S", "Li"]
    log_probs = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    assert model_ranker(context, log_probs, elements, 1)[0][1] == ("F",)
    strict = chemistry_ranker(pool=5, penalty=STRICT_PENALTY)(context, log_probs, elements, 4)
    assert [species for _, species in strict] == [("O",), ("S",), ("F",), ("Cl",)]
    assert strict[0][0] == pytest.approx(np.log(0.15)), "a SMACT-valid completion keeps the model's log-probability"
    assert strict[2][0] == -np.inf
    mild = chemistry_ranker(pool=5, penalty=ChemistryPenalty(0.5, 0.5))(context, log_probs, elements, 4)
    assert [species for _, species in mild] == [("F",), ("Cl",), ("O",), ("S",)], "ln .4 - .5 > ln .3 - .5 > ln .15 > ln .1"
    assert mild[0][0] == pytest.approx(np.log(0.4) - 0.5)
    assert [score for score, _ in mild] == sorted((score for score, _ in mild), reverse=True)


def _sample_context(token_lists, tied: bool, wanted) -> tuple[MaskContext, list[str]]:
    """The first sample crystal (masking all orbits of its most common element) for which ``wanted(context, truth)``."""
    from crystal_tokenizers.wyckoff.masking import element_positions

    for tokens in token_lists:
        orbit_elements = [tokens[i] for i in element_positions(tokens)]
        element = Counter(orbit_elements).most_common(1)[0][0]
        orbits = [k for k, e in enumerate(orbit_elements) if e == element]
        context = _masked(tokens, orbits, tied)
        truth = [element] * len(orbits)
        if wanted(context, truth):
            return context, truth
    raise AssertionError("no sample crystal fits")


def test_alpha_fill_gives_one_absent_element_to_every_masked_orbit(token_lists):
    # a real crystal with >= 3 orbits of one element; per-orbit favourites disagree, the joint choice may not
    context, truth = _sample_context(token_lists, True, lambda c, t: len(t) >= 3)
    elements = ["O", "S", "F", "Se", "N", *sorted(context.known_counts())]
    rng = np.random.default_rng(0)
    log_probs = np.log(rng.dirichlet(np.ones(len(elements)), size=len(truth)))
    assert len({row.argmax() for row in log_probs}) > 1, "orbit favourites differ"
    present = set(context.known_counts())
    ranked = ranker_for_mode("soft")(context, log_probs, elements, 5)
    assert len(ranked) == 5
    for score, assignment in ranked:
        assert len(set(assignment)) == 1 and len(assignment) == len(truth)
        assert assignment[0] not in present
        joint = log_probs[:, elements.index(assignment[0])].sum()
        assert score == pytest.approx(joint - DEFAULT_PENALTY.of(completed_counts(context, assignment))), \
            "score = sum over the tied orbits - SMACT penalty"
    strict = ranker_for_mode("strict")(context, log_probs, elements, 5)
    assert all(len(set(a)) == 1 and a[0] not in present for _, a in strict)


def test_balanced_fill_ranks_above_imbalanced_of_equal_probability(token_lists):
    # a real crystal whose masked element gives a SMACT-valid composition while a common alternative
    # does not balance under any SMACT oxidation states (mixed valence allowed)
    others = ("F", "Cl", "O", "S", "N", "Li", "Na", "K", "Mg", "Ca", "H")

    def imbalanced(context, truth):
        return [e for e in others if e not in context.known_counts() and e != truth[0]
                and smact_flags(completed_counts(context, [e] * len(truth))) == (False, False)]

    def fits(context, truth):
        return is_charge_neutral(completed_counts(context, truth)) and bool(imbalanced(context, truth))

    context, truth = _sample_context(token_lists, True, fits)
    other = imbalanced(context, truth)[0]
    for elements in ([other, truth[0]], [truth[0], other]):
        log_probs = np.full((len(truth), 2), np.log(0.5))
        ranked = chemistry_ranker(pool=2)(context, log_probs, elements, 2)
        assert [a[0] for _, a in ranked] == [truth[0], other], f"order of {elements} must not matter"
        assert model_ranker(context, log_probs, elements, 1)[0][1][0] == elements[0], "the plain model just takes the first"


def test_soft_lets_a_confident_model_keep_a_smact_invalid_truth(token_lists):
    # real crystals whose own composition SMACT rejects exist (intermetallic-like nitrides, borides ...): strict
    # ranking must replace their element, soft ranking keeps it when the model is confident enough
    candidates = ["O", "S", "F", "Cl", "N", "Se", "I", "Br"]

    def invalid_truth(context, truth):
        return not is_charge_neutral(completed_counts(context, truth)) and truth[0] not in candidates and any(
            is_charge_neutral(completed_counts(context, [e] * len(truth))) for e in candidates
            if e not in context.known_counts())

    context, truth = _sample_context(token_lists, True, invalid_truth)
    elements = [truth[0], *[e for e in candidates if e not in context.known_counts()]]
    margin = max(DEFAULT_PENALTY.unbalanced, DEFAULT_PENALTY.other) + 1.0
    row = np.full(len(elements), -margin - 1.0)
    row[0] = -1.0
    log_probs = np.tile(row, (len(truth), 1)) / len(truth)  # joint: truth -1, every other element -(margin + 1)
    soft = ranker_for_mode("soft")(context, log_probs, elements, 1)[0][1]
    strict = ranker_for_mode("strict")(context, log_probs, elements, 1)[0][1]
    assert soft == tuple(truth)
    assert strict != tuple(truth) and is_charge_neutral(completed_counts(context, strict))


def test_unknown_chemistry_mode_is_refused():
    with pytest.raises(ValueError, match="'loose' is not one of"):
        ranker_for_mode("loose")


def test_baselines_fill_every_masked_orbit(token_lists):
    stats = ElementStatistics.from_token_lists(token_lists)
    frequency, pairs = stats.frequency, stats.pairs
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
    chem = inpaint(with_oxygen, model, tokenizer, mask_element="O", top_k=3, chemistry="strict")
    soft = inpaint(with_oxygen, model, tokenizer, mask_element="O", top_k=3, chemistry="soft")
    from training.evaluate import is_compositionally_valid
    neutral_plain = sum(is_compositionally_valid(r.completions[0].structure.composition) for r in plain if r.completions)
    neutral_chem = sum(is_compositionally_valid(r.completions[0].structure.composition) for r in chem if r.completions)
    assert all(r.error is None and r.completions for r in chem + soft)
    assert neutral_chem >= neutral_plain
    assert all(len(set(c.species)) == 1 for r in soft for c in r.completions), "a tied mask fills one element"
    for result, structure in zip(chem, with_oxygen):
        present = {str(e) for e in structure.composition.elements} - {"O"}
        assert all(c.species[0] not in present for c in result.completions), "a tied mask takes an absent element"
    words = tokenizer.structure_to_string(with_oxygen[0]).split()
    words = ["<mask>" if w == "O" and words[i + 1].startswith("wp:") else w for i, w in enumerate(words[:-1])] + words[-1:]
    text = " ".join(words)
    answers = pipeline("fill-mask", model=model, tokenizer=tokenizer)(text, top_k=6)
    ranked = chemistry_fill_mask(text, answers, top_k=4, tied=True, strict=True)
    assert 1 <= len(ranked) <= 4
    flags = [r["charge_neutral"] for r in ranked]
    assert flags == sorted(flags, reverse=True), "charge-neutral completions come first"
    assert all(len(set(r["species"])) == 1 for r in chemistry_fill_mask(text, answers, top_k=4, tied=True))
    assert all(r["sequence"].count("<mask>") == 0 for r in ranked)
    # a dominant co-occurrence prior: the best absent candidate by the prior alone comes first
    from crystal_tokenizers.wyckoff.statistics import ElementStatistics
    from training.chemistry import cooccurrence_log_prior

    stats = ElementStatistics.from_token_lists(
        tokenizer.convert_ids_to_tokens(tokenizer(tokenizer.structure_to_string(s))["input_ids"]) for s in structures)
    context = MaskContext(tuple(words), tuple(i for i, w in enumerate(words) if w == "<mask>"), True)
    candidates = sorted({a["token_str"].strip() for site in answers for a in site} - set(context.known_counts()))
    prior = cooccurrence_log_prior(stats.frequency, stats.pairs)(context, candidates)
    led = chemistry_fill_mask(text, answers, top_k=1, tied=True, statistics=stats, prior_weight=1e4)
    assert led[0]["species"][0] == candidates[int(np.argmax(prior))]


def test_element_statistics_count_crystals_and_survive_a_save(token_lists, tmp_path):
    stats = ElementStatistics.from_token_lists(token_lists)
    assert stats.crystals == len(token_lists)
    oxides = sum("O" in tokens for tokens in token_lists)
    assert stats.frequency["O"] == oxides and stats.pairs[("O", "Li")] == stats.pairs[("Li", "O")]
    path = tmp_path / "stats.json"
    stats.save(str(path))
    assert ElementStatistics.load(str(path)) == stats
    path.write_text('{"crystals": 3, "frequency": {"O": 2}, "pairs": {"O": 1}}')
    with pytest.raises(ValueError, match="stats.json: malformed element statistics"):
        ElementStatistics.load(str(path))


def test_the_cooccurrence_prior_decides_between_equally_probable_elements(token_lists):
    # an even model: the prior alone picks the masked element, and picks what co-occurs with the rest
    stats = ElementStatistics.from_token_lists(token_lists)
    context = _masked(token_lists[0], [0], tied=True)
    elements = ["O", "S", "F", "N", "Cl", "Se"]
    flat = np.zeros((len(context.masked_positions), len(elements)))
    with_prior = ranker_for_mode("soft", stats, prior_weight=5.0)(context, flat, elements, len(elements))
    expected = cooccurrence_baseline(stats.frequency, stats.pairs)(context, flat, elements, 1)[0][1]
    if expected[0] in elements:
        assert with_prior[0][1] == expected or not is_charge_neutral(completed_counts(context, expected))
    scores = [score for score, _ in with_prior]
    assert len(set(np.round(scores, 6))) > 1, "the prior must separate elements the model cannot"
    assert ranker_for_mode("soft", stats, prior_weight=0.0)(context, flat, elements, 1) == \
        ranker_for_mode("soft")(context, flat, elements, 1)
    with pytest.raises(ValueError, match="prior_weight must be >= 0"):
        ranker_for_mode("soft", stats, prior_weight=-1.0)
