"""Tests of WyckoffGPT: value embedding and mixture heads, the loss, value sampling inside generate(), KV cache, remote code."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from modeling.configuration_wyckoff_gpt import WyckoffGPTConfig
from modeling.modeling_wyckoff_gpt import WyckoffGPTForCausalLM
from modeling.numeric import (
    DEFAULT_VALUE_KINDS,
    GaussianValueEmbedding,
    mixture_log_prob,
    mixture_sample,
)
from training.sampling import encode_prompts

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "crystal_tokenizers" / "data" / "mp20_sample.csv"


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def texts(tokenizer: WyckoffTokenizer) -> list[str]:
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cifs = pd.read_csv(SAMPLE_CSV)["cif"][:8]
        return [tokenizer.structure_to_string(Structure.from_str(cif, fmt="cif"), composition=True) for cif in cifs]


def tiny_model(tokenizer: WyckoffTokenizer, seed: int = 0, **overrides) -> WyckoffGPTForCausalLM:
    torch.manual_seed(seed)
    sizes = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 64, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}
    return WyckoffGPTForCausalLM(WyckoffGPTConfig.from_tokenizer(tokenizer, **{**sizes, **overrides})).eval()


# ---------------------------------------------------------------------------------------------- numeric pieces

@pytest.mark.parametrize("kind", ["fractional", "length", "angle", "scalar"])
def test_mixture_density_integrates_to_one(kind):
    torch.manual_seed(0)
    params = torch.randn(3, 3, 4)
    grids = {"fractional": (0.0, 1.0), "length": (1e-3, 200.0), "angle": (-200.0, 380.0), "scalar": (-60.0, 60.0)}
    low, high = grids[kind]
    step = (high - low) / 400_000
    x = low + step * torch.arange(400_000, dtype=torch.float64)
    for row in params:
        density = mixture_log_prob(DEFAULT_VALUE_KINDS[kind], row.expand(len(x), 3, 4), x).exp()
        assert float(density.double().sum() * step) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_samples_stay_in_their_domains(temperature):
    torch.manual_seed(0)
    params = 3.0 * torch.randn(4000, 3, 8)
    fractional = mixture_sample(DEFAULT_VALUE_KINDS["fractional"], params, temperature)
    length = mixture_sample(DEFAULT_VALUE_KINDS["length"], params, temperature)
    angle = mixture_sample(DEFAULT_VALUE_KINDS["angle"], params, temperature)
    assert bool(((fractional >= 0) & (fractional < 1)).all())
    assert bool((length > 0).all()) and bool(torch.isfinite(length).all())
    assert bool(((angle > 0) & (angle < 180)).all())


def test_greedy_value_is_heaviest_component_and_temperature_sharpens():
    params = torch.zeros(1, 3, 2)
    params[0, 0] = torch.tensor([2.0, 0.0])  # component 0 is heavier
    params[0, 1] = torch.tensor([1.0, -1.0])  # standardised locations
    params[0, 2] = torch.tensor([0.0, 0.0])
    kind = DEFAULT_VALUE_KINDS["angle"]
    assert float(mixture_sample(kind, params, greedy=True)) == pytest.approx(kind.location + kind.scale)
    torch.manual_seed(0)
    cold = mixture_sample(kind, params.expand(20000, 3, 2), temperature=0.1)
    hot = mixture_sample(kind, params.expand(20000, 3, 2), temperature=2.0)
    assert float(cold.std()) < float(hot.std())


def test_value_embedding_separates_scales():
    embedding = GaussianValueEmbedding(16)
    features = embedding.features(torch.tensor([0.25, 0.26, 5.0, 5.5, 90.0, -2.0]))
    assert features.shape == (6, 3 * 32 + 64 + 1)
    assert not torch.allclose(features[0], features[1], atol=1e-3)  # fractional resolution
    assert not torch.allclose(features[2], features[3], atol=1e-3)  # lengths
    assert float(features[5, -1]) == -1.0  # the sign feature


# ---------------------------------------------------------------------------------------------- model

def test_config_from_tokenizer_round_trips(tokenizer, tmp_path):
    config = WyckoffGPTConfig.from_tokenizer(tokenizer, n_layer=1)
    assert config.num_token_id == tokenizer.num_token_id
    assert config.numeric_kind_token_ids == tokenizer.numeric_kind_token_ids
    config.save_pretrained(tmp_path)
    assert WyckoffGPTConfig.from_pretrained(tmp_path).numeric_kind_token_ids == tokenizer.numeric_kind_token_ids
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of n_head"):
        WyckoffGPTConfig.from_tokenizer(tokenizer, n_embd=30, n_head=4)


def test_loss_is_token_ce_plus_weighted_value_nll(tokenizer, texts):
    model = tiny_model(tokenizer, numeric_loss_weight=0.5)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    assert float(out.loss) == pytest.approx(float(out.token_loss + 0.5 * out.numeric_loss), rel=1e-6)
    out.loss.backward()
    assert model.numeric_head.projection.weight.grad.abs().sum() > 0
    assert model.transformer.value_embedding.projection.weight.grad.abs().sum() > 0


def test_values_enter_the_model(tokenizer, texts):
    model = tiny_model(tokenizer)
    batch = tokenizer(texts[:1], return_tensors="pt")
    shifted = batch["numeric_values"] + 0.1
    base = model(**batch).logits
    moved = model(input_ids=batch["input_ids"], numeric_values=shifted).logits
    first_num = int((batch["input_ids"][0] == tokenizer.num_token_id).nonzero()[0])
    assert torch.allclose(base[:, :first_num], moved[:, :first_num])  # causal: nothing before the value changes
    assert not torch.allclose(base[:, first_num:], moved[:, first_num:])


def test_training_steps_lower_the_loss(tokenizer, texts):
    model = tiny_model(tokenizer).train()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(**batch, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append((float(out.token_loss), float(out.numeric_loss)))
    assert losses[-1][0] < 0.7 * losses[0][0]
    assert losses[-1][1] < losses[0][1]


def _generate(model, tokenizer, prompts, **kwargs):
    inputs = encode_prompts(tokenizer, prompts)
    max_length = inputs["input_ids"].shape[1] + 120
    return model.generate(
        **inputs, max_length=max_length, logits_processor=[tokenizer.grammar_processor(max_length=max_length)],
        return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def test_cached_and_uncached_greedy_generation_are_identical(tokenizer):
    model = tiny_model(tokenizer)
    prompts = ["<sep>", "cs:cubic <sep>", "<composition> Na n:4 Cl n:4 <sep>", "<sep> sg:1 O wp:1a@1 <lat> a 4.0"]
    cached = _generate(model, tokenizer, prompts, do_sample=False, use_cache=True)
    uncached = _generate(model, tokenizer, prompts, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(torch.isnan(cached.numeric_values), torch.isnan(uncached.numeric_values))
    finite = torch.isfinite(cached.numeric_values)
    assert int(finite.sum()) > 8
    assert torch.allclose(cached.numeric_values[finite], uncached.numeric_values[finite], atol=1e-5)


def test_generate_returns_values_aligned_with_sequences(tokenizer):
    model = tiny_model(tokenizer)
    prompt = "<sep> sg:225 Na wp:4a@22 Cl wp:4b@22 <lat> a 5.64"
    torch.manual_seed(0)
    out = _generate(model, tokenizer, [prompt], do_sample=True, temperature=1.5, top_k=50, num_return_sequences=3)
    assert out.sequences.shape == out.numeric_values.shape and out.sequences.shape[0] == 3
    is_num = out.sequences == tokenizer.num_token_id
    assert torch.equal(torch.isfinite(out.numeric_values), is_num)
    prompt_length = encode_prompts(tokenizer, [prompt])["input_ids"].shape[1]
    assert torch.allclose(out.numeric_values[:, prompt_length - 1], torch.tensor(5.64))  # prompt value kept
    structures = tokenizer.decode_structures(out)
    assert all(not isinstance(s, Exception) for s in structures), structures
    assert all(s.lattice.a == pytest.approx(5.64, abs=1e-5) for s in structures)


def test_sampled_values_follow_the_value_head(tokenizer):
    """The value drawn for a <num> is the head's greedy value at the label's position."""
    model = tiny_model(tokenizer)
    out = _generate(model, tokenizer, ["<sep> sg:225 Na wp:4a@22 <lat>"], do_sample=False)
    sequence, values = out.sequences, out.numeric_values
    column = int((sequence[0] == tokenizer.num_token_id).nonzero()[0])  # the lattice length a
    forward = model(input_ids=sequence[:, :column], numeric_values=values[:, :column])
    expected = model.numeric_head.sample(forward.numeric_params[:, -1], forward.numeric_kind_ids[:, -1], greedy=True)
    assert float(values[0, column]) == pytest.approx(float(expected[0]), rel=1e-5)


@pytest.mark.slow
def test_saved_model_generates_in_a_fresh_process(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from training.sampling import generate_crystals
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
torch.manual_seed(0)
samples = generate_crystals(model, tok, ["<sep>"] * 8, temperature=1.0)
print(json.dumps({{"cls": type(model).__module__, "decoded": sum(s.structure is not None for s in samples)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["decoded"] == 8
    assert report["cls"].startswith("transformers_modules")  # loaded from the saved folder's code
    assert (tmp_path / "modeling_wyckoff_gpt.py").exists() and (tmp_path / "configuration_wyckoff_gpt.py").exists()


@pytest.fixture(scope="module")
def saved_tiny_model(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wyckoff_gpt")
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_command_writes_cifs_and_counts(saved_tiny_model, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "cifs"
    code = main(["generate", "--model", str(saved_tiny_model), "--n", "6", "--crystal-system", "cubic",
                 "--batch-size", "3", "--out", str(out), "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line on stdout"
    counts = json.loads(lines[0])
    assert code == 0
    assert counts["sampled"] == counts["decoded"] == 6
    assert 0 <= counts["valid"] <= 6
    assert len(list(out.glob("*.cif"))) == 6


def test_generated_samples_csv_carries_the_declared_symmetry_to_evaluate(saved_tiny_model, tmp_path, capsys):
    """samples.csv keeps each sample's declared space group and its crystal-system condition, so evaluate
    judges space-group consistency and crystal-system hit rate (a bare CIF folder cannot: its CIFs are P1)."""
    import pandas as pd

    from training.cli import main
    from training.evaluate import crystal_system_of

    out = tmp_path / "cifs"
    assert main(["generate", "--model", str(saved_tiny_model), "--n", "6", "--crystal-system", "cubic",
                 "--batch-size", "3", "--out", str(out)]) == 0
    table = pd.read_csv(out / "samples.csv")
    assert list(table["material_id"]) == sorted(f.stem for f in out.glob("*.cif"))
    assert set(table["crystal_system"]) == {"cubic"}
    assert all(crystal_system_of(int(n)) == "cubic" for n in table["spacegroup"])  # the grammar's prefix
    capsys.readouterr()
    assert main(["evaluate", str(out / "samples.csv"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == len(table)
    if metrics["n_valid_samples"]:
        assert metrics["spg_consistency"] is not None and metrics["crystal_system_hit_rate"] is not None


def test_generate_command_keeps_the_best_ranked_samples(saved_tiny_model, tmp_path, capsys):
    """--keep: n samples stream to candidates.csv; the kept ones are the closest to the target, best first."""
    from modeling import CrystalMLMConfig, CrystalMLMForSequenceClassification
    from training.cli import main

    predictor = tmp_path / "predictor"
    tokenizer = WyckoffTokenizer()
    config = CrystalMLMConfig.from_tokenizer(tokenizer, n_layer=1, n_embd=32, n_head=2, num_labels=1,
                                             problem_type="regression")
    CrystalMLMForSequenceClassification(config).save_pretrained(predictor)
    tokenizer.save_pretrained(predictor)
    out = tmp_path / "ranked"
    code = main(["generate", "--model", str(saved_tiny_model), "--n", "8", "--batch-size", "4", "--keep", "3",
                 "--rank-by", "formation_energy_per_atom", "--target", "-1.0", "--predictor", str(predictor),
                 "--out", str(out), "--json"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and counts["sampled"] == 8 and counts["kept"] == 3
    candidates, kept = pd.read_csv(out / "candidates.csv"), pd.read_csv(out / "kept.csv")
    assert len(candidates) == 8
    scored = candidates.dropna(subset=["deviation"]).sort_values("deviation", kind="stable")
    assert kept["deviation"].tolist() == pytest.approx(scored["deviation"].head(3).tolist())
    assert len(list((out / "kept").glob("*.cif"))) == 3


def test_csp_command_with_template_keeps_the_template(saved_tiny_model, capsys):
    from training.cli import main

    code = main(["csp", str(SAMPLE_CSV), "--model", str(saved_tiny_model), "--template", "--samples", "2",
                 "--limit", "3", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert result["n_crystals"] == 3 and result["n_samples"] == 6
    assert result["n_decoded_samples"] == 6  # composition + template + grammar: every sample decodes
    assert 0.0 <= result["match_rate"] <= 1.0
