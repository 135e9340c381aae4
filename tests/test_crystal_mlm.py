"""CrystalMLM: corruption, masked-reconstruction loss, adversarial gradients, save/load, inpainting, fill-mask."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from crystal_tokenizers import WyckoffTokenizer
from crystal_tokenizers.wyckoff.masking import (
    MASK,
    MaskingSpec,
    coordinate_value_positions,
    corrupt,
    element_positions,
    fractional_noise_scales,
    orbits_of_species,
)
from modeling.configuration_crystal_mlm import CrystalMLMConfig
from modeling.modeling_crystal_mlm import CrystalMLMForMaskedLM, CrystalMLMForSequenceClassification
from training.objectives import (
    AdversarialFineTuning,
    GanSpec,
    MaskedReconstruction,
    ObjectiveConfigError,
    PropertyHead,
    PropertySpec,
    build_objective,
    clean_inputs,
)
from training.data import CrystalCollator
from training.inpaint import independent_candidates, inpaint, tied_candidates

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "num_mixture_components": 2,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "classifier_pdrop": 0.0}


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    table = pd.read_csv(SAMPLE).head(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in table["cif"]]


@pytest.fixture(scope="module")
def texts(tokenizer, structures) -> list[str]:
    return [tokenizer.structure_to_string(s) for s in structures]


def _model(tokenizer, cls=CrystalMLMForMaskedLM, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(CrystalMLMConfig.from_tokenizer(tokenizer, **{**TINY, **overrides}))


def _corrupted_batch(tokenizer, texts, spec=MaskingSpec(), seed=0):
    objective = MaskedReconstruction(tokenizer, spec, seed)
    return objective.collator(CrystalCollator(tokenizer))([{"text": t} for t in texts])


# ------------------------------------------------------------------ masking (pure functions)


def test_species_mask_hides_every_orbit_of_that_element(tokenizer, texts):
    text = next(t for t in texts if " O wp:" in t)
    encoded = tokenizer(text)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    orbits = orbits_of_species(tokens, "O")
    damaged = corrupt(tokens, np.asarray(encoded["numeric_values"]), np.random.default_rng(0), masked_orbits=orbits, noise_scale=0.0)
    sites = element_positions(tokens)
    assert set(damaged.masked_positions) == {sites[k] for k in orbits}
    assert all(damaged.tokens[p] == MASK for p in damaged.masked_positions)
    assert "O" not in [damaged.tokens[p] for p in sites]
    assert damaged.noised_positions == ()


def test_noise_touches_only_coordinates_with_the_documented_scale(tokenizer, texts):
    text = max(texts, key=lambda t: t.count(" x ") + t.count(" y ") + t.count(" z "))
    encoded = tokenizer(text)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    values = np.asarray(encoded["numeric_values"], dtype=float)
    damaged = corrupt(tokens, values, np.random.default_rng(1), masked_orbits=[0], noise_scale=0.2)
    changed = {i for i in range(len(values)) if np.isfinite(values[i]) and not np.isclose(values[i], damaged.values[i])}
    assert changed <= set(coordinate_value_positions(tokens)) and changed
    assert set(damaged.noised_positions) == set(coordinate_value_positions(tokens))
    assert np.all((damaged.values[list(damaged.noised_positions)] >= 0) & (damaged.values[list(damaged.noised_positions)] < 1))
    scales = fractional_noise_scales(tokens, values, 0.2)
    assert math.isclose(scales.max(), 0.2) and np.all(scales <= 0.2 + 1e-12)


def test_masking_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="mask_fraction"):
        MaskingSpec(mask_fraction=0.0)
    with pytest.raises(ValueError, match="noise_scale"):
        MaskingSpec(noise_scale=-0.1)


# ------------------------------------------------------------------ the masked model


def test_corrupted_batch_labels_exactly_the_damaged_positions(tokenizer, texts):
    clean = tokenizer(texts, padding=True, return_tensors="pt")
    batch = _corrupted_batch(tokenizer, texts)
    masked = batch["labels"] != -100
    assert torch.all(batch["input_ids"][masked] == tokenizer.mask_token_id)
    assert torch.all(batch["input_ids"][~masked] == clean["input_ids"][~masked])
    assert masked.any(dim=1).all(), "every crystal has at least one masked orbit"
    ids, values = clean_inputs(batch)
    assert torch.equal(ids, clean["input_ids"])
    assert torch.equal(torch.nan_to_num(values, nan=-1.0), torch.nan_to_num(clean["numeric_values"].float(), nan=-1.0))


def test_only_masked_and_noised_positions_contribute_to_the_loss(tokenizer, texts):
    model = _model(tokenizer, position_mse_weight=200.0)
    batch = _corrupted_batch(tokenizer, texts)
    output = model(**batch)
    grad_logits, grad_params = torch.autograd.grad(output.loss, (output.logits, output.numeric_params))
    labelled_tokens = batch["labels"] != -100
    labelled_values = torch.isfinite(batch["numeric_labels"])
    assert grad_logits[~labelled_tokens].abs().max() == 0
    assert grad_logits[labelled_tokens].abs().sum() > 0
    assert grad_params[~labelled_values].abs().max() == 0
    assert grad_params[labelled_values].abs().sum() > 0
    expected = torch.nn.functional.cross_entropy(output.logits[labelled_tokens], batch["labels"][labelled_tokens])
    assert torch.allclose(output.species_loss, expected)


def test_masked_positions_only_score_elements(tokenizer, texts):
    model = _model(tokenizer)
    batch = _corrupted_batch(tokenizer, texts)
    logits = model(**batch).logits
    at_mask = batch["input_ids"] == tokenizer.mask_token_id
    top = logits[at_mask].argmax(dim=-1).tolist()
    assert set(top) <= set(model.config.element_token_ids)


def test_save_and_fresh_process_load_give_identical_logits(tokenizer, texts, tmp_path):
    model = _model(tokenizer).eval()
    batch = _corrupted_batch(tokenizer, texts[:4])
    inputs = {k: batch[k] for k in ("input_ids", "numeric_values", "attention_mask")}
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForMaskedLM\n"
        "model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "inputs = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    out = model(**inputs)\n"
        "torch.save({'logits': out.logits, 'values': out.predicted_values, 'cls': type(model).__name__}, sys.argv[3])\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path,
    )
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["cls"] == "CrystalMLMForMaskedLM"
    assert torch.equal(loaded["logits"], expected.logits)
    assert torch.equal(torch.nan_to_num(loaded["values"], nan=-1.0), torch.nan_to_num(expected.predicted_values, nan=-1.0))
    assert (tmp_path / "model" / "modeling_crystal_mlm.py").exists()


def test_sequence_classifier_reuses_the_pretrained_backbone(tokenizer, texts, tmp_path):
    masked = _model(tokenizer)
    masked.save_pretrained(tmp_path)
    classifier = CrystalMLMForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert torch.equal(classifier.transformer.wte.weight, masked.transformer.wte.weight)
    encoded = tokenizer(texts[:3], padding=True, return_tensors="pt")
    output = classifier(**encoded, labels=torch.tensor([0, 1, 1]))
    assert output.logits.shape == (3, 2) and torch.isfinite(output.loss)


def test_sequence_classifier_pools_only_real_tokens(tokenizer, texts):
    classifier = _model(tokenizer, CrystalMLMForSequenceClassification, num_labels=2).eval()
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts[:4]]
    assert len(set(lengths)) > 1  # the batch is padded
    with torch.no_grad():
        batched = classifier(**tokenizer(texts[:4], padding=True, return_tensors="pt")).logits
        alone = torch.cat([classifier(**tokenizer([t], return_tensors="pt")).logits for t in texts[:4]])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_loop_collator_gives_the_classifier_row_labels_not_token_labels(tokenizer, texts):
    from training.loop import forward_arguments

    classifier = _model(tokenizer, CrystalMLMForSequenceClassification, num_labels=2)
    hull = [0.0, 0.03, 0.0, 0.07]
    rows = [{"text": t, "properties": {"e_above_hull": e}} for t, e in zip(texts[:4], hull)]
    objective = build_objective({"task": {"property": "e_above_hull", "type": "classification"}}, tokenizer)
    batch = objective.collator(CrystalCollator(tokenizer, model_inputs=forward_arguments(classifier)))(rows)
    assert batch["labels"].tolist() == [1, 0, 1, 0] and "numeric_values" in batch
    output = classifier(**batch)
    assert torch.allclose(output.loss, torch.nn.functional.cross_entropy(output.logits, batch["labels"]))


# ------------------------------------------------------------------ objectives


def test_property_head_labels_on_hull_rows():
    spec = PropertySpec(property="e_above_hull", type="classification", threshold=0.0)
    labels = PropertyHead(spec).labels([{"properties": {"e_above_hull": 0.0}}, {"properties": {"e_above_hull": 0.03}}])
    assert labels.tolist() == [1, 0]
    with pytest.raises(ObjectiveConfigError, match="no property"):
        PropertyHead(spec).labels([{"material_id": "x", "properties": {}}])


def test_build_objective_checks_its_blocks(tokenizer):
    assert type(build_objective({}, tokenizer)).__name__ == "TrainingObjective"
    assert isinstance(build_objective({"masking": {"noise_scale": 0.2}}, tokenizer), MaskedReconstruction)
    with pytest.raises(ObjectiveConfigError, match="unknown keys"):
        build_objective({"masking": {"sigma": 0.2}}, tokenizer)
    with pytest.raises(ObjectiveConfigError, match="discriminator"):
        build_objective({"gan": {}}, tokenizer)


@pytest.fixture()
def adversarial(tokenizer, tmp_path):
    from accelerate import Accelerator

    critic = _model(tokenizer, CrystalMLMForSequenceClassification, num_labels=2)
    critic.save_pretrained(tmp_path / "critic")
    generator = _model(tokenizer, position_mse_weight=200.0)
    objective = AdversarialFineTuning(
        tokenizer, MaskingSpec(), GanSpec(discriminator=str(tmp_path / "critic"), gradient_penalty=10.0)
    )
    objective.prepare(Accelerator(cpu=True), generator)
    return objective, generator


def test_adversarial_term_alone_reaches_the_generator(tokenizer, texts, adversarial):
    objective, generator = adversarial
    objective.gan = GanSpec(
        discriminator=objective.gan.discriminator, adversarial_weight=1.0, species_weight=0.0,
        position_mse_weight=0.0, numeric_nll_weight=0.0,
    )
    batch = _corrupted_batch(tokenizer, texts)
    objective.generator_loss(generator, batch).backward()
    grads = {name: p.grad for name, p in generator.named_parameters()}
    assert grads["transformer.h.0.attn.c_attn.weight"] is not None
    assert grads["transformer.h.0.attn.c_attn.weight"].abs().sum() > 0
    assert generator.lm_head.weight.grad.abs().sum() > 0, "soft species carry the critic's gradient to the species head"
    assert grads["numeric_head.projection.weight"].abs().sum() > 0, "generated coordinates carry it to the value head"
    assert all(p.grad is None for p in objective.discriminator.parameters()), "the critic is frozen in the generator step"


def test_critic_step_updates_only_the_critic(tokenizer, texts, adversarial):
    objective, generator = adversarial
    batch = _corrupted_batch(tokenizer, texts)
    critic_before = [p.detach().clone() for p in objective.discriminator.parameters()]
    generator_before = [p.detach().clone() for p in generator.parameters()]
    loss = objective.critic_step(generator, batch)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, objective.discriminator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(generator_before, generator.parameters()))
    assert all(p.grad is None for p in generator.parameters())


# ------------------------------------------------------------------ inpainting


def test_candidate_ranking_is_exact_for_small_cases():
    log_probs = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]))
    ids = np.array([10, 11, 12])
    independent = independent_candidates(log_probs, ids, top_k=3)
    assert [c[1] for c in independent] == [(10, 11), (11, 11), (10, 10)]
    tied = tied_candidates(log_probs, ids, top_k=2)
    assert [c[1] for c in tied] == [(11, 11), (10, 10)]
    assert math.isclose(math.exp(tied[0][0]), 0.3 * 0.7)


def test_inpaint_output_decodes_to_structures(tokenizer, structures):
    model = _model(tokenizer)
    with_oxygen = [s for s in structures if "O" in s.composition.chemical_system.split("-")]
    results = inpaint(with_oxygen, model, tokenizer, mask_element="O", top_k=3)
    assert len(results) == len(with_oxygen)
    for result, original in zip(results, with_oxygen):
        assert result.error is None
        assert len(result.completions) == 3
        probabilities = [c.probability for c in result.completions]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-9
        for completion in result.completions:
            assert isinstance(completion.structure, Structure)
            assert len(set(completion.species)) == 1, "a masked element takes one candidate on all its orbits"
            assert len(completion.structure) == len(tokenizer.string_to_structure(tokenizer.structure_to_string(original)))
    noisy = inpaint(structures[:4], model, tokenizer, mask_fraction=0.3, noise=0.1, top_k=2)
    assert all(len(r.completions) + r.failed_completions == 2 for r in noisy)
    missing = inpaint(structures[:1], model, tokenizer, mask_element="Og")
    assert missing[0].error is not None and "not in the crystal" in missing[0].error


def test_inpaint_command_writes_cifs(tokenizer, structures, tmp_path, capsys):
    from training.cli import main

    model = _model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    source = tmp_path / "input.cif"
    structure = next(s for s in structures if "O" in s.composition.chemical_system.split("-"))
    structure.to(filename=str(source))
    code = main(["inpaint", str(source), "--model", str(tmp_path / "model"), "--mask-element", "O",
                 "--top-k", "2", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(printed["completions"]) == 2 and printed["original_species"][0] == "O"
    cifs = sorted((tmp_path / "out").rglob("*.cif"))
    assert len(cifs) == 2
    assert all(len(Structure.from_file(str(p))) > 0 for p in cifs)


def test_fill_mask_pipeline_returns_k_candidates_per_masked_site(tokenizer, texts):
    from transformers import pipeline

    model = _model(tokenizer).eval()
    text = next(t for t in texts if t.count(" wp:") >= 2)
    words = text.split()
    sites = [i for i in range(len(words) - 1) if words[i + 1].startswith("wp:")][:2]
    for i in sites:
        words[i] = tokenizer.mask_token
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    answers = fill(" ".join(words), top_k=4)
    assert len(answers) == 2 and all(len(site) == 4 for site in answers)
    elements = {tokenizer.convert_ids_to_tokens(i) for i in model.config.element_token_ids}
    for site in answers:
        assert all(candidate["token_str"].strip() in elements for candidate in site)
        scores = [candidate["score"] for candidate in site]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-6
