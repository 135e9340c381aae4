"""Tests of training/predictors.py: a sequence-classification model + tokenizer as predict(structures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure
from transformers import GPT2Config, GPT2ForSequenceClassification

from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from training import cli
from training.evaluate import evaluate_structures
from training.predictors import Standardization, load_predictor, make_predictor

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def crystals() -> list[Structure]:
    return [Structure.from_str(cif, fmt="cif") for cif in pd.read_csv(SAMPLE).cif[:6]]


def tiny_model(tokenizer: WyckoffTokenizer, num_labels: int) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2,
        num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return GPT2ForSequenceClassification(config).eval()


def test_regression_predictor_matches_the_model_one_by_one(
    tokenizer: WyckoffTokenizer, crystals: list[Structure]
) -> None:
    model = tiny_model(tokenizer, num_labels=1)
    predict = make_predictor(model, tokenizer, standardization=Standardization(mean=1.0, std=2.0), batch_size=4)
    values = predict(crystals)
    assert values.shape == (len(crystals),) and np.isfinite(values).all()
    encoded = tokenizer(tokenizer.structure_to_string(crystals[3]), return_tensors="pt")
    with torch.no_grad():
        single = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    assert values[3] == pytest.approx(float(single[0, 0]) * 2.0 + 1.0, abs=1e-4)


def test_unencodable_structures_get_nan(tokenizer: WyckoffTokenizer, crystals: list[Structure]) -> None:
    disordered = Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    values = make_predictor(tiny_model(tokenizer, 1), tokenizer)([crystals[0], disordered])
    assert np.isfinite(values[0]) and np.isnan(values[1])


def test_classification_predictor_gives_class_ids_or_probabilities(
    tokenizer: WyckoffTokenizer, crystals: list[Structure]
) -> None:
    model = tiny_model(tokenizer, num_labels=3)
    model.config.id2label = {0: "cubic", 1: "hexagonal", 2: "trigonal"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    ids = make_predictor(model, tokenizer)(crystals)
    assert set(ids) <= {0.0, 1.0, 2.0}
    probabilities = make_predictor(model, tokenizer, output="cubic")(crystals)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    with pytest.raises(ValueError, match="cubics"):
        make_predictor(model, tokenizer, output="cubics")


def test_saved_predictor_loads_and_plugs_into_evaluate(
    tokenizer: WyckoffTokenizer, crystals: list[Structure], tmp_path: Path
) -> None:
    model = tiny_model(tokenizer, num_labels=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    predict = load_predictor(tmp_path)
    expected = make_predictor(model, tokenizer)(crystals)
    assert predict(crystals) == pytest.approx(expected, abs=1e-5)
    report = evaluate_structures(crystals, targets={"band_gap": 1.0}, predictors={"band_gap": predict})
    valid = [r for r in report.records if "band_gap" in r.predicted]
    assert report.properties["band_gap"]["n"] == len(valid) > 0
    deviation = np.mean([abs(r.predicted["band_gap"] - 1.0) for r in valid])
    assert report.properties["band_gap"]["mean_abs_deviation"] == pytest.approx(deviation)


def test_cli_judges_a_property_target_with_a_saved_predictor(
    tokenizer: WyckoffTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    model = tiny_model(tokenizer, num_labels=1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pd.read_csv(SAMPLE).head(5).to_csv(tmp_path / "gen.csv", index=False)
    (tmp_path / "targets.json").write_text(json.dumps({"band_gap": 1.0, "crystal_system": "cubic"}))
    args = ["evaluate", str(tmp_path / "gen.csv"), "--targets", str(tmp_path / "targets.json")]
    assert cli.main([*args, "--predictor", f"band_gap={tmp_path / 'model'}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["properties"]["band_gap"]["n"] == result["n_valid_samples"] == 5
    assert result["properties"]["band_gap"]["mean_abs_deviation"] >= 0.0
    assert 0.0 <= result["crystal_system_hit_rate"] <= 1.0
