"""Fine-tuning a WyckoffGPT on new properties: ``prop:`` tokens appended, scalar labels, PEFT loading, CLI, card."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from crystal_tokenizers import WyckoffTokenizer
from modeling import WyckoffGPTConfig, WyckoffGPTForCausalLM
from training.cli import main as cli_main
from training.finetune import (
    FinetuneConfig,
    FinetuneError,
    add_property_tokens,
    finetune,
    load_finetuned,
    lora_model,
)
from training.io import parse_cif
from training.sampling import generate_crystals

NEW = ("density_g_cm3", "volume_per_atom_a3")
"""Properties no WyckoffGPT vocabulary has: mass density (g/cm³) and volume per atom (Å³), from pymatgen."""


def tiny_base(tokenizer: WyckoffTokenizer) -> WyckoffGPTForCausalLM:
    config = WyckoffGPTConfig.from_tokenizer(tokenizer, n_positions=256, n_embd=32, n_layer=1, n_head=2, n_inner=64)
    torch.manual_seed(0)
    return WyckoffGPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("wyckoff") / "tiny-wyckoff-base"
    tiny_base(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory, sample_table) -> Path:
    """24 real MP-20 crystals (bundled sample) with their density (g/cm³) and volume per atom (Å³)."""
    rows = []
    for cif in sample_table.cif.head(24):
        structure = parse_cif(cif)
        rows.append({"cif": cif, NEW[0]: float(structure.density), NEW[1]: structure.volume / len(structure)})
    path = tmp_path_factory.mktemp("data") / "density.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir, data_csv):
    out = tmp_path_factory.mktemp("lora") / "density-adapter"
    config = FinetuneConfig(lora=True, lora_rank=4, lr=1e-2, max_steps=3, batch_size=8, warmup_steps=1, max_length=256)
    return finetune(base_dir, data_csv, NEW, out, config)


def scalar_kind(model) -> int:
    """Index of the scalar value kind in the model's value head."""
    return next(i for i, kind in enumerate(model.numeric_head.kinds) if kind.name == "scalar")


def test_with_properties_appends_tokens_and_keeps_every_id(tokenizer):
    extended = tokenizer.with_properties(NEW)
    assert len(extended) == len(tokenizer) + 2
    assert extended.convert_tokens_to_ids([f"prop:{name}" for name in NEW]) == [len(tokenizer), len(tokenizer) + 1]
    vocab = tokenizer.get_vocab()
    assert {token: extended.get_vocab()[token] for token in vocab} == vocab
    assert extended.numeric_kind_token_ids["scalar"][-2:] == [len(tokenizer), len(tokenizer) + 1]
    with pytest.raises(ValueError, match="band_gap"):
        tokenizer.with_properties(["band_gap"])


def test_resize_registers_new_property_tokens_as_scalar_labels(tokenizer):
    model = tiny_base(tokenizer)
    extended = tokenizer.with_properties(NEW)
    new_ids = add_property_tokens(model, extended, NEW)
    assert new_ids == [len(tokenizer), len(tokenizer) + 1]
    assert set(new_ids) <= set(model.config.numeric_kind_token_ids["scalar"])
    assert model.kind_of_token[new_ids].tolist() == [scalar_kind(model)] * 2
    off = tiny_base(tokenizer)
    off.config.added_token_kind = None
    with pytest.raises(FinetuneError, match="added_token_kind"):
        add_property_tokens(off, extended, NEW)


def test_resized_kinds_labels_appended_ids_and_drops_cut_ones():
    from modeling.layers import resized_kinds

    kinds = {"length": [1, 2], "scalar": [5, 9]}
    assert resized_kinds(kinds, 10, 12, "scalar") == {"length": [1, 2], "scalar": [5, 9, 10, 11]}
    assert resized_kinds(kinds, 10, 12, None) == kinds
    assert resized_kinds(kinds, 10, 12, "angle") == kinds, "a kind the value head lacks is not created"
    assert resized_kinds(kinds, 10, 8, "scalar") == {"length": [1, 2], "scalar": [5]}


def _adapter(tmp_path: Path, tokenizer: WyckoffTokenizer):
    """A 'trained' adapter with the new tokens (every trainable weight moved), saved beside its base."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_base(tokenizer)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    extended = tokenizer.with_properties(NEW)
    model = tiny_base(tokenizer)
    peft = lora_model(model, FinetuneConfig(lora_rank=4), add_property_tokens(model, extended, NEW))
    with torch.no_grad():
        for parameter in (p for p in peft.parameters() if p.requires_grad):
            parameter.add_(0.05)
    peft.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft.save_pretrained(adapter_dir, save_embedding_layers=False)
    model.config.save_pretrained(adapter_dir)
    extended.save_pretrained(adapter_dir)
    return peft.eval(), base_dir, adapter_dir, extended


def test_adapter_with_new_tokens_loads_the_standard_peft_ways(tmp_path, tokenizer, sample_structures):
    """AutoPeftModelForCausalLM and PeftModel on the resized base give the fine-tune's logits and values."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft, base_dir, adapter_dir, extended = _adapter(tmp_path, tokenizer)
    text = extended.structure_to_string(sample_structures[0], properties={NEW[0]: 4.2, NEW[1]: 15.0})
    inputs = extended(f"<bos> {text}", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = peft(**inputs)
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=True).eval()
        base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
        base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=True)))
        plain = PeftModel.from_pretrained(base, adapter_dir).eval()
        untouched = WyckoffGPTForCausalLM.from_pretrained(base_dir).eval()
        untouched.resize_token_embeddings(len(extended))
        before = untouched(**inputs)
    new_positions = torch.isin(inputs["input_ids"][0], torch.tensor(extended.convert_tokens_to_ids(
        [f"prop:{name}" for name in NEW])))
    assert int(new_positions.sum()) == 2
    assert expected.numeric_kind_ids[0, new_positions].tolist() == [scalar_kind(peft.get_base_model())] * 2
    for loaded in (auto, plain):
        out = loaded(**inputs)
        torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.numeric_params, expected.numeric_params, rtol=0, atol=1e-6)
        assert torch.equal(out.numeric_kind_ids, expected.numeric_kind_ids)
    assert not torch.allclose(before.logits, expected.logits), "the adapter must change the model"


def test_a_sample_conditioned_on_the_new_property_decodes(tmp_path, tokenizer):
    from peft import AutoPeftModelForCausalLM

    _, _, adapter_dir, extended = _adapter(tmp_path, tokenizer)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=True).eval()
    prompt = extended.condition_prefix(properties={NEW[0]: 5.0})
    assert prompt.startswith(f"prop:{NEW[0]} 5.0")
    torch.manual_seed(0)
    samples = generate_crystals(model, extended, [prompt] * 4, batch_size=4)
    assert len(samples) == 4 and sum(s.structure is not None for s in samples) >= 1
    # a <num> generated after a new prop: token gets a drawn value (a scalar label), not NaN
    ids = extended(f"<bos> prop:{NEW[1]}", add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=1, do_sample=True, logits_processor=[_Only(extended.num_token_id)])
    assert out.sequences[0, -1] == extended.num_token_id and torch.isfinite(out.numeric_values[0, -1])


class _Only:
    """Logits processor that allows one token id only."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


def test_lora_finetune_of_a_wyckoff_base(lora_run, data_csv, base_dir, tokenizer):
    table = pd.read_csv(data_csv)
    assert lora_run.rows_used == 24 and lora_run.steps == 3 and lora_run.model_type == "wyckoff_gpt"
    assert lora_run.property_means[0] == pytest.approx(table[NEW[0]].mean())
    saved = json.loads((lora_run.out_dir / "config.json").read_text())
    assert saved["vocab_size"] == len(tokenizer) + 2
    assert saved["numeric_kind_token_ids"]["scalar"][-2:] == [len(tokenizer), len(tokenizer) + 1]
    adapter = json.loads((lora_run.out_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["base_model_name_or_path"] == str(base_dir.resolve())
    model = load_finetuned(lora_run.out_dir)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 2


def test_cli_generate_samples_from_a_wyckoff_adapter(lora_run, tmp_path, capsys):
    out = tmp_path / "cifs"
    code = cli_main(["generate", "--model", str(lora_run.out_dir), "--n", "4", "--batch-size", "4",
                     "--property", f"{NEW[1]}=15", "--property", f"{NEW[0]}=5.0", "--out", str(out), "--json"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["sampled"] == 4
    assert counts["prompt"] == f"prop:{NEW[0]} 5.000000 prop:{NEW[1]} 15.000000 <sep>", "the fine-tune's order"
    assert counts["decoded"] == len(list(out.glob("*.cif")))
    code = cli_main(["generate", "--model", str(lora_run.out_dir), "--n", "1", "--property", "bulk_modulus_gpa=100"])
    assert code == 2 and "bulk_modulus_gpa" in capsys.readouterr().err


def test_adapter_card_front_matter(lora_run, base_dir):
    text = (lora_run.out_dir / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == base_dir.name
    assert {"peft", "lora", "wyckoff", "wyckoff_gpt"} <= set(front["tags"])
    assert [p["name"] for p in front["new_properties"]] == list(NEW)
    assert [p["unit"] for p in front["new_properties"]] == ["g/cm³", "Å³"]
    assert front["new_properties"][0]["mean"] == pytest.approx(lora_run.property_means[0], rel=1e-5)
    assert "AutoPeftModelForCausalLM.from_pretrained" in text and "base.resize_token_embeddings(len(tokenizer))" in text
    assert "24 rows" in text and "steps: 3" in text
    assert str(base_dir.parent) not in text, "no machine-local path in the card"


def test_a_hub_id_names_the_base_and_the_local_base_still_loads(base_dir, data_csv, tmp_path):
    out = tmp_path / "adapter"
    config = FinetuneConfig(lora=True, lora_rank=2, max_steps=1, batch_size=8, warmup_steps=0, max_length=256, limit=8)
    finetune(base_dir, data_csv, NEW[:1], out, config, base_id="crystal-lm/tiny-wyckoff")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "crystal-lm/tiny-wyckoff"
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["base_model"] == "crystal-lm/tiny-wyckoff"
    model = load_finetuned(out)  # the Hub id is not reachable here: the recorded local base is used
    assert model.get_input_embeddings().weight.shape[0] == len(WyckoffTokenizer()) + 1


def test_base_model_name_is_never_a_local_path(tmp_path):
    from training.finetune import base_model_name

    (tmp_path / "wyckoff-small" / "final").mkdir(parents=True)
    assert base_model_name(tmp_path / "wyckoff-small" / "final") == "wyckoff-small"
    assert base_model_name(tmp_path / "wyckoff-small") == "wyckoff-small"
    assert base_model_name(tmp_path / "wyckoff-small", base_id="org/wyckoff") == "org/wyckoff"
    assert base_model_name("org/on-the-hub") == "org/on-the-hub"


def test_finetune_refuses_a_property_the_tokenizer_has(base_dir, data_csv, tmp_path):
    table = pd.read_csv(data_csv).assign(band_gap=1.0)
    table.to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(FinetuneError, match="band_gap"):
        finetune(base_dir, tmp_path / "gap.csv", ["band_gap"], tmp_path / "x", FinetuneConfig(max_steps=1))


@pytest.mark.slow
def test_adapter_loads_and_samples_where_crystal_lm_is_not_installed(tmp_path, tokenizer, sample_structures):
    """The adapter folder + its base load with AutoPeftModelForCausalLM from remote code alone, same logits."""
    from test_remote_code import run_without_package

    peft, _, adapter_dir, extended = _adapter(tmp_path, tokenizer)
    text = extended.structure_to_string(sample_structures[0], properties={NEW[0]: 4.2})
    inputs = extended(f"<bos> {text}", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = peft(**inputs).logits[0, -1].tolist()
    out = run_without_package(f"""
        import json, torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(adapter_dir)!r}, trust_remote_code=True)
        model = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r}, trust_remote_code=True).eval()
        inputs = tokenizer({f"<bos> {text}"!r}, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].tolist()
        torch.manual_seed(0)
        prompt = tokenizer.prompt_inputs(properties={{{NEW[0]!r}: 5.0}})
        generated = model.generate(**prompt, do_sample=True, max_length=200,
                                   logits_processor=[tokenizer.grammar_processor(max_length=200)])
        decoded = [not isinstance(s, Exception) for s in tokenizer.decode_structures(generated)]
        print(json.dumps({{"logits": logits, "decoded": decoded}}))
    """, tmp_path)
    torch.testing.assert_close(torch.tensor(out["logits"]), torch.tensor(expected), rtol=0, atol=1e-5)
    assert out["decoded"] == [True]
