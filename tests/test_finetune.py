"""Fine-tuning MatterGPT on new property conditions: extended config, LoRA adapter save/load, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer
from modeling.configuration_mattergpt import MatterGPTConfig
from modeling.modeling_mattergpt import MatterGPTForCausalLM
from training.cli import main as cli_main
from training.conditions import ConditionError, condition_tensors
from training.finetune import (
    FinetuneConfig,
    FinetuneError,
    extend_conditions,
    finetune,
    load_finetuned,
)

ROOT = Path(__file__).resolve().parents[1]
NEW = ("band_gap", "e_above_hull")


def tiny_base(tokenizer: SlicesPlusTokenizer) -> MatterGPTForCausalLM:
    """A 1-block-per-flow MatterGPT conditioned on formation energy (eV/atom), random weights."""
    config = MatterGPTConfig(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2, n_inner=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        property_names=("formation_energy_per_atom",), property_means=(-1.5,), property_stds=(1.0,),
    )
    torch.manual_seed(0)
    return MatterGPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> SlicesPlusTokenizer:
    return SlicesPlusTokenizer(symmetry=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tiny_base(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory, sample_table, tokenizer) -> Path:
    """32 real MP-20 crystals as plain SLICES strings with band gap (eV) and energy above hull (eV/atom)."""
    from training.io import parse_cif

    rows = []
    for record in sample_table.head(60).to_dict("records"):
        texts = tokenizer.structures_to_strings([parse_cif(record["cif"])])
        text = texts[0]
        if isinstance(text, str) and len(text.split()) < 200:
            rows.append({"slices": text, "band_gap": record["band_gap"], "e_above_hull": record["e_above_hull"]})
    assert len(rows) >= 32
    path = tmp_path_factory.mktemp("data") / "rows.csv"
    pd.DataFrame(rows[:32]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir, data_csv):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    config = FinetuneConfig(lora=True, lora_rank=4, lr=1e-2, max_steps=4, batch_size=8, warmup_steps=1, max_length=256)
    return finetune(base_dir, data_csv, NEW, out, config)


def test_extend_conditions_appends_properties_and_keeps_base_weights(tokenizer):
    base = tiny_base(tokenizer)
    extended = extend_conditions(base, NEW, (1.0, 0.05), (1.5, 0.1))
    assert list(extended.config.property_names) == ["formation_energy_per_atom", *NEW]
    assert list(extended.config.property_means) == [-1.5, 1.0, 0.05]
    assert list(extended.config.property_stds) == [1.0, 1.5, 0.1]
    old, new = base.state_dict(), extended.state_dict()
    for key, value in old.items():
        if "property_embedding" in key:
            assert new[key].shape[0] == 3
            assert torch.equal(new[key][:1], value)
        else:
            assert torch.equal(new[key], value), key


def test_extend_conditions_refuses_a_property_the_base_has(tokenizer):
    with pytest.raises(FinetuneError, match="already conditions"):
        extend_conditions(tiny_base(tokenizer), ("formation_energy_per_atom",), (0.0,), (1.0,))


def test_condition_tensors_mask_only_the_given_targets(tokenizer):
    extended = extend_conditions(tiny_base(tokenizer), NEW, (1.0, 0.05), (1.5, 0.1))
    values, mask = condition_tensors(extended.config, {"band_gap": 2.0}, batch_size=3)
    assert values.shape == mask.shape == (3, 3)
    assert mask[0].tolist() == [False, True, False] and values[0, 1] == 2.0
    with pytest.raises(ConditionError, match="does not condition"):
        condition_tensors(extended.config, {"bulk_modulus_gpa": 100.0}, batch_size=1)


def test_lora_finetune_trains_few_parameters_and_stores_statistics(lora_run, data_csv):
    table = pd.read_csv(data_csv)
    assert lora_run.rows_used == 32 and lora_run.steps == 4
    assert lora_run.trainable_parameters < lora_run.total_parameters / 3
    assert lora_run.property_means[0] == pytest.approx(table.band_gap.mean())
    saved = json.loads((lora_run.out_dir / "config.json").read_text())
    assert saved["property_names"] == ["formation_energy_per_atom", *NEW]
    assert saved["property_stds"][1] == pytest.approx(table.band_gap.std())
    assert (lora_run.out_dir / "adapter_model.safetensors").exists()
    assert not (lora_run.out_dir / "training" / "final").exists()


@pytest.mark.slow
def test_adapter_reloads_in_a_fresh_process_with_identical_logits(lora_run, base_dir, tmp_path):
    ids = torch.tensor([[1, 37, 108, 108, 174, 173, 173, 108, 108, 173]])
    props = torch.tensor([[0.0, 1.2, 0.03]])
    mask = torch.tensor([[0, 1, 1]])
    model = load_finetuned(lora_run.out_dir)
    with torch.no_grad():
        expected = model(ids, properties=props, property_mask=mask).logits
    script = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForCausalLM
        from training.finetune import extend_conditions
        config = AutoConfig.from_pretrained({str(lora_run.out_dir)!r}, trust_remote_code=True)
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, trust_remote_code=True)
        base = extend_conditions(base, config.property_names[1:], config.property_means[1:], config.property_stds[1:])
        model = PeftModel.from_pretrained(base, {str(lora_run.out_dir)!r}).eval()
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()}), properties=torch.tensor({props.tolist()}),
                           property_mask=torch.tensor({mask.tolist()})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)
    base_only = MatterGPTForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        before = base_only(ids, properties=props[:, :1], property_mask=mask[:, :1]).logits
    assert not torch.allclose(before, expected), "the adapter must change the model"


@pytest.mark.slow
def test_cli_full_finetune_saves_a_loadable_model(base_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "full"
    code = cli_main(["finetune", "--base", str(base_dir), "--data", str(data_csv), "--property", "band_gap",
                     "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--max-length", "256", "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line on stdout"
    summary = json.loads(lines[0])
    assert summary["steps"] == 2 and summary["property_names"] == ["band_gap"]
    model = load_finetuned(out)
    assert isinstance(model, MatterGPTForCausalLM)
    assert list(model.config.property_names) == ["formation_energy_per_atom", "band_gap"]


def test_cli_reports_a_missing_property_column(base_dir, data_csv, tmp_path, capsys):
    code = cli_main(["finetune", "--base", str(base_dir), "--data", str(data_csv), "--property", "bulk_modulus_gpa",
                     "--out", str(tmp_path / "x")])
    assert code == 2
    assert "bulk_modulus_gpa" in capsys.readouterr().err


def test_token_strings_encode_a_cif_column_and_prefer_a_text_column(sample_table, tokenizer):
    from training.finetune import token_strings
    from training.io import parse_cif

    table = sample_table.head(3)[["cif"]]
    texts = token_strings(table, tokenizer)
    assert texts == [tokenizer.structure_to_string(parse_cif(cif)) for cif in table.cif]
    assert token_strings(table.assign(slices=["a", "", "c"]), tokenizer) == ["a", None, "c"]
    with pytest.raises(FinetuneError, match="need one of the columns"):
        token_strings(table.rename(columns={"cif": "structure"}), tokenizer)


def test_adapter_with_new_conditions_loads_the_standard_peft_ways(tmp_path: Path) -> None:
    """PeftModel on the untouched base and AutoPeftModelForCausalLM both give the fine-tune's logits."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from crystal_tokenizers import SlicesPlusTokenizer
    from modeling import MatterGPTConfig
    from training.finetune import FinetuneConfig, extend_conditions, lora_model

    tokenizer = SlicesPlusTokenizer()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    torch.manual_seed(0)
    base = MatterGPTForCausalLM(MatterGPTConfig(
        vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_inner=64, property_names=["a", "b"],
        property_means=[0.0, 0.0], property_stds=[1.0, 1.0], bos_token_id=1, eos_token_id=2, pad_token_id=0))
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft = lora_model(extend_conditions(base, ["K", "G"], [100.0, 50.0], [30.0, 20.0]), FinetuneConfig())
    with torch.no_grad():
        for parameter in (p for p in peft.parameters() if p.requires_grad):
            parameter.add_(0.01)  # a "trained" adapter: LoRA and the grown property embedding move
    peft.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    ids = torch.tensor([[1, 20, 21]])
    properties = torch.tensor([[float("nan"), float("nan"), 120.0, 60.0]])
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids, properties=properties).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True),
                                          adapter_dir).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=True).eval()
        for loaded in (plain, auto):
            torch.testing.assert_close(loaded(input_ids=ids, properties=properties).logits, expected)


def test_load_finetuned_adopts_the_adapter_conditions(lora_run):
    model = load_finetuned(lora_run.out_dir)
    assert list(model.config.property_names) == ["formation_energy_per_atom", *NEW]
    assert model.config.property_stds[1:] == pytest.approx(list(lora_run.property_stds))
    assert model.get_base_model().transformer.property_embedding.num_properties == 3


def test_cli_generate_samples_from_a_mattergpt_adapter(lora_run, tmp_path, capsys):
    code = cli_main(["generate", "--model", str(lora_run.out_dir), "--n", "3", "--batch-size", "3",
                     "--property", "band_gap=1.5", "--out", str(tmp_path / "cifs"), "--json"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["sampled"] == 3 and "band_gap" in counts["prompt"]
    assert counts["decoded"] == len(list((tmp_path / "cifs").glob("*.cif")))


def test_mattergpt_adapter_card(lora_run, base_dir):
    import yaml

    text = (lora_run.out_dir / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == base_dir.name
    assert {"peft", "lora", "mattergpt"} <= set(front["tags"])
    assert [(p["name"], p["unit"]) for p in front["new_properties"]] == [("band_gap", "eV"), ("e_above_hull", "eV/atom")]
    assert "PeftModel.from_pretrained(base, adapter)" in text and "resize_token_embeddings" not in text
    assert "32 rows" in text and "steps: 4" in text and str(base_dir.parent) not in text
