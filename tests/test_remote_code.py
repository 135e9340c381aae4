"""A saved folder is self-contained: it loads, generates and decodes where crystal-lm cannot be imported.

Each folder (model + tokenizer, as ``crystal-lm push --local-dir`` writes them) is loaded in a fresh Python
process whose import system refuses ``crystal_tokenizers``, ``modeling``, ``training`` and ``hub_cards``: only
transformers, torch and the third-party crystallography packages are there, as for a Hub user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from crystal_tokenizers import SlicesPlusTokenizer, WyckoffTokenizer
from modeling import (
    CrystalMLMConfig,
    CrystalMLMForMaskedLM,
    MatterGPTConfig,
    MatterGPTForCausalLM,
    WyckoffGPTConfig,
    WyckoffGPTForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "crystal_tokenizers" / "data" / "mp20_sample.csv"
SIZES = dict(n_layer=1, n_embd=32, n_head=2, n_inner=64)

BLOCKER = """
import sys
BLOCKED = {"crystal_tokenizers", "modeling", "training", "hub_cards"}
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: crystal-lm is not installed here)")
        return None
sys.meta_path.insert(0, _Blocker())
for root in BLOCKED:
    try:
        __import__(root)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the blocker failed: {root} imported")
"""


def run_without_package(script: str, tmp_path: Path) -> dict:
    """Run ``script`` (after the import blocker) in a fresh process outside the repository; its JSON output."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crystals() -> list[Structure]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in pd.read_csv(SAMPLE_CSV)["cif"][:3]]


def test_wyckoff_gpt_folder_loads_generates_and_decodes_without_the_package(tmp_path, crystals):
    tokenizer = WyckoffTokenizer()
    torch.manual_seed(0)
    WyckoffGPTForCausalLM(WyckoffGPTConfig.from_tokenizer(tokenizer, **SIZES)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    text = tokenizer.structure_to_string(crystals[0])
    out = run_without_package(f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
        folder = {str(tmp_path / "m")!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        torch.manual_seed(0)
        prompt = tok.prompt_inputs(["<bos>"] * 3)["input_ids"]
        generated = model.generate(prompt, do_sample=True, max_new_tokens=120,
                                   logits_processor=[tok.grammar_processor()])
        decoded = tok.decode_structures(generated)
        real = tok.string_to_structure({text!r})
        print(json.dumps({{"config": type(config).__name__, "base": type(base).__name__,
                          "model": type(model).__module__, "tokenizer": type(tok).__module__,
                          "decoded": sum(hasattr(s, "lattice") for s in decoded),
                          "real_formula": real.composition.reduced_formula}}))
    """, tmp_path)
    assert out["config"] == "WyckoffGPTConfig" and out["base"] == "WyckoffGPTModel"
    assert out["model"].startswith("transformers_modules.") and out["tokenizer"].startswith("transformers_modules.")
    assert out["decoded"] == 3
    assert out["real_formula"] == crystals[0].composition.reduced_formula


def test_mattergpt_folder_loads_generates_and_decodes_without_the_package(tmp_path, crystals):
    tokenizer = SlicesPlusTokenizer()
    torch.manual_seed(0)
    config = MatterGPTConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SIZES)
    MatterGPTForCausalLM(config).save_pretrained(tmp_path / "m")
    tokenizer.fit_training_statistics([tokenizer.structure_to_string(c) for c in crystals])
    tokenizer.save_pretrained(tmp_path / "m")
    text = tokenizer.structure_to_string(crystals[1])
    out = run_without_package(f"""
        import json, torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        folder = {str(tmp_path / "m")!r}
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        head = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=7)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        torch.manual_seed(0)
        prompt = torch.full((2, 1), tok.bos_token_id)
        generated = model.generate(prompt, do_sample=True, max_new_tokens=40, crystal_system=torch.tensor([0, 3]),
                                   logits_processor=[tok.grammar_processor()])
        texts = [tok.ids_to_text(row) for row in generated]
        real = tok.string_to_structure({text!r})
        print(json.dumps({{"base": type(base).__name__, "head": type(head).__name__, "texts": texts,
                          "real_formula": real.composition.reduced_formula, "graphs": tok.coordination.graphs}}))
    """, tmp_path)
    assert out["base"] == "MatterGPTModel" and out["head"] == "MatterGPTForSequenceClassification"
    assert out["graphs"] == 3, "the coordination table travels with the folder"
    assert all(isinstance(t, str) and t for t in out["texts"])
    assert out["real_formula"] == crystals[1].composition.reduced_formula


def test_crystal_mlm_folder_loads_and_fills_masks_without_the_package(tmp_path, crystals):
    tokenizer = WyckoffTokenizer()
    torch.manual_seed(0)
    CrystalMLMForMaskedLM(CrystalMLMConfig.from_tokenizer(tokenizer, **SIZES)).save_pretrained(tmp_path / "m")
    tokenizer.fit_training_statistics([tokenizer.structure_to_string(c) for c in crystals])
    tokenizer.save_pretrained(tmp_path / "m")
    text = tokenizer.structure_to_string(crystals[2])
    out = run_without_package(f"""
        import json, torch
        from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer
        folder = {str(tmp_path / "m")!r}
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
        head = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        batch = tok([{text!r}], return_tensors="pt")
        ids = batch["input_ids"].clone()
        elements = torch.isin(ids, torch.tensor(tok.element_token_ids))
        ids[elements] = tok.mask_token_id
        with torch.no_grad():
            logits = model(ids, numeric_values=batch["numeric_values"]).logits
        predicted = logits[elements].argmax(-1)
        print(json.dumps({{"base": type(base).__name__, "head": type(head).__name__,
                          "all_elements": bool(torch.isin(predicted, torch.tensor(tok.element_token_ids)).all()),
                          "masked": int(elements.sum()), "crystals": tok.element_statistics.crystals}}))
    """, tmp_path)
    assert out["base"] == "CrystalMLMModel" and out["head"] == "CrystalMLMForSequenceClassification"
    assert out["crystals"] == 3, "the element statistics travel with the folder"
    assert out["masked"] > 0 and out["all_elements"]
