"""``pipeline("text-generation")`` / ``pipeline("fill-mask")`` on saved folders answer with decodable crystals.

Tiny untrained models saved with their tokenizers; each folder names its pipeline in ``config.json``
(``custom_pipelines``) and carries its code, so the same calls work in-process and in a process where
crystal-lm cannot be imported (the import blocker of ``tests/test_remote_code.py``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Structure
from transformers import pipeline

from crystal_tokenizers import CRYSTAL_SYSTEMS, SlicesPlusTokenizer, WyckoffTokenizer
from modeling import (
    CrystalFillMaskPipeline,
    CrystalMLMConfig,
    CrystalMLMForMaskedLM,
    CrystalTextGenerationPipeline,
    MatterGPTConfig,
    MatterGPTForCausalLM,
    WyckoffGPTConfig,
    WyckoffGPTForCausalLM,
)
from modeling.crystal_pipelines import CRYSTAL_SYSTEMS as PIPELINE_CRYSTAL_SYSTEMS
from tests.test_remote_code import SAMPLE_CSV, SIZES, run_without_package

WYCKOFF = WyckoffTokenizer()
SLICES = SlicesPlusTokenizer()


def _parse_cif(cif: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(cif, fmt="cif")


@pytest.fixture(scope="module")
def crystals() -> list[Structure]:
    return [_parse_cif(cif) for cif in pd.read_csv(SAMPLE_CSV)["cif"][:3]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny WyckoffGPT, MatterGPT and CrystalMLM, each with its tokenizer."""
    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    models = {
        "wyckoff": (WyckoffGPTForCausalLM(WyckoffGPTConfig.from_tokenizer(WYCKOFF, **SIZES)), WYCKOFF),
        "matter": (MatterGPTForCausalLM(MatterGPTConfig(
            vocab_size=len(SLICES), bos_token_id=SLICES.bos_token_id, eos_token_id=SLICES.eos_token_id,
            pad_token_id=SLICES.pad_token_id, property_names=("band_gap",), **SIZES)), SLICES),
        "mlm": (CrystalMLMForMaskedLM(CrystalMLMConfig.from_tokenizer(WYCKOFF, **SIZES)), WYCKOFF),
    }
    paths = {}
    for name, (model, tokenizer) in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def _masked_text(text: str, count: int) -> str:
    """``text`` with its first ``count`` element tokens (one per orbit) replaced by ``<mask>``."""
    words = text.split()
    orbits = [i for i, word in enumerate(words) if word.startswith("wp:")][:count]
    for index in orbits:
        words[index - 1] = "<mask>"
    return " ".join(words)


def _words(text: str) -> list[str]:
    """The words of a Wyckoff text that are not values."""
    return [word for word in text.split() if WYCKOFF.tokenize(word) != ["<num>"]]


def _assert_wyckoff_answer(answer: dict) -> None:
    """The text decodes (Wyckoff tokenizer) to the answer's structure; its CIF parses to the same composition."""
    assert answer["error"] is None and isinstance(answer["structure"], Structure)
    decoded = WYCKOFF.string_to_structure(answer.get("generated_text") or answer["sequence"])
    assert decoded.composition == answer["structure"].composition
    np.testing.assert_allclose(decoded.lattice.abc, answer["structure"].lattice.abc, atol=1e-4)
    np.testing.assert_allclose(decoded.frac_coords, answer["structure"].frac_coords, atol=1e-4)
    assert _parse_cif(answer["cif"]).composition.reduced_formula == decoded.composition.reduced_formula


def test_pipeline_crystal_systems_are_the_package_order():
    assert PIPELINE_CRYSTAL_SYSTEMS == tuple(CRYSTAL_SYSTEMS)


def test_saved_folders_name_their_pipeline(folders):
    entries = {name: json.loads((path / "config.json").read_text())["custom_pipelines"]
               for name, path in folders.items()}
    assert set(entries["wyckoff"]) == set(entries["matter"]) == {"text-generation"}
    assert set(entries["mlm"]) == {"fill-mask"}
    assert all((path / "crystal_pipelines.py").is_file() for path in folders.values())


def test_wyckoff_text_generation_returns_decodable_crystals(folders):
    pipe = pipeline("text-generation", model=str(folders["wyckoff"]), trust_remote_code=True)
    assert type(pipe).__name__ == "CrystalTextGenerationPipeline"
    assert int(pipe.preprocess("")["input_ids"][0, -1]) != WYCKOFF.eos_token_id
    torch.manual_seed(0)
    batches = pipe(["", "sg:225"], num_return_sequences=2, space_group=225, elements=["Na", "Cl"], batch_size=2)
    assert [len(samples) for samples in batches] == [2, 2]
    for answer in (a for samples in batches for a in samples):
        assert answer["generated_text"].startswith("sg:225 <elements> Na Cl <sep> sg:225 ")
        _assert_wyckoff_answer(answer)
        assert set(answer["structure"].composition.chemical_system.split("-")) <= {"Na", "Cl"}
    greedy = [pipe("", crystal_system="cubic", do_sample=False)[0]["generated_text"] for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("cs:cubic <sep> ")
    cold = pipe("", crystal_system="cubic", temperature=1e-6, num_return_sequences=2)  # ~ greedy tokens
    assert [_words(a["generated_text"]) for a in cold] == [_words(greedy[0])] * 2


def test_wyckoff_text_generation_reports_decode_errors(folders):
    pipe = pipeline("text-generation", model=str(folders["wyckoff"]), trust_remote_code=True)
    [answer] = pipe("", grammar=False, max_new_tokens=2)
    assert len(answer["generated_text"].split()) <= 3  # "<sep>" and two new tokens
    assert answer["structure"] is None and answer["cif"] is None and answer["error"]
    with pytest.raises(ValueError, match="cubical"):
        pipe("", crystal_system="cubical")


def test_mattergpt_text_generation_returns_crystals_or_errors(folders, crystals):
    pipe = pipeline("text-generation", model=str(folders["matter"]), trust_remote_code=True)
    torch.manual_seed(0)
    samples = pipe("", num_return_sequences=3, crystal_system="cubic", properties={"band_gap": 1.0}, max_new_tokens=40)
    assert len(samples) == 3
    for answer in samples:
        assert (answer["error"] is None) == isinstance(answer["structure"], Structure) == isinstance(answer["cif"], str)
        assert isinstance(answer["generated_text"], str) and answer["generated_text"]
    text = SLICES.structure_to_string(crystals[1])
    [answer] = pipe(text, max_new_tokens=1)
    assert answer["generated_text"] == text and answer["error"] is None
    assert answer["structure"].composition == SLICES.string_to_structure(text).composition == crystals[1].composition
    assert _parse_cif(answer["cif"]).composition == crystals[1].composition
    with pytest.raises(ValueError, match="space_group"):
        pipe("", space_group=225)
    with pytest.raises(ValueError, match="bulk_modulus"):
        pipe("", properties={"bulk_modulus": 100.0})


def test_pipeline_classes_take_model_objects(folders, crystals):
    generator = pipeline("text-generation", model=WyckoffGPTForCausalLM.from_pretrained(folders["wyckoff"]),
                         tokenizer=WYCKOFF, pipeline_class=CrystalTextGenerationPipeline)
    [answer] = generator("", elements=["Li", "O"])
    _assert_wyckoff_answer(answer)
    filler = pipeline("fill-mask", model=CrystalMLMForMaskedLM.from_pretrained(folders["mlm"]), tokenizer=WYCKOFF,
                      pipeline_class=CrystalFillMaskPipeline)
    [answer] = filler(_masked_text(WYCKOFF.structure_to_string(crystals[0]), 1), top_k=1)
    _assert_wyckoff_answer(answer)


def test_fill_mask_keeps_the_values_and_decodes(folders, crystals):
    pipe = pipeline("fill-mask", model=str(folders["mlm"]), trust_remote_code=True)
    assert type(pipe).__name__ == "CrystalFillMaskPipeline"
    text = WYCKOFF.structure_to_string(crystals[2])
    values = text.split("<lat>")[1]
    single = pipe(_masked_text(text, 1), top_k=3)
    assert len(single) == 3
    for answer in single:
        assert answer["sequence"].endswith(values) and "<mask>" not in answer["sequence"]
        assert answer["token_str"] in answer["sequence"].split()
        _assert_wyckoff_answer(answer)
    several = pipe(_masked_text(text, 2), top_k=2)
    assert [len(site) for site in several] == [2, 2]
    for answer in (a for site in several for a in site):
        assert answer["sequence"].endswith(values)
        _assert_wyckoff_answer(answer)


def test_pipelines_work_without_the_package(folders, crystals, tmp_path):
    text = SLICES.structure_to_string(crystals[1])
    masked = _masked_text(WYCKOFF.structure_to_string(crystals[2]), 1)
    out = run_without_package(f"""
        import json, torch
        from transformers import pipeline
        folders = {dict((k, str(v)) for k, v in folders.items())!r}
        def plain(answers):
            return [{{k: v for k, v in a.items() if k != "structure"}} | {{"decoded": a["structure"] is not None}}
                    for a in answers]
        torch.manual_seed(0)
        generate = pipeline("text-generation", model=folders["wyckoff"], trust_remote_code=True)
        matter = pipeline("text-generation", model=folders["matter"], trust_remote_code=True)
        fill = pipeline("fill-mask", model=folders["mlm"], trust_remote_code=True)
        print(json.dumps({{
            "modules": [type(p).__module__ for p in (generate, matter, fill)],
            "wyckoff": plain(generate("", num_return_sequences=2, crystal_system="cubic")),
            "matter_random": plain(matter("", num_return_sequences=2, max_new_tokens=30)),
            "matter_real": plain(matter({text!r}, max_new_tokens=1)),
            "fill": plain(fill({masked!r}, top_k=2)),
        }}))
    """, tmp_path)
    assert all(module.startswith("transformers_modules.") for module in out["modules"])
    assert len(out["wyckoff"]) == 2 and len(out["fill"]) == 2
    for answer in out["wyckoff"] + out["fill"]:
        assert answer["decoded"] and answer["error"] is None
        decoded = WYCKOFF.string_to_structure(answer.get("generated_text") or answer["sequence"])
        assert _parse_cif(answer["cif"]).composition.reduced_formula == decoded.composition.reduced_formula
    assert len(out["matter_random"]) == 2
    assert all(a["decoded"] == (a["error"] is None) for a in out["matter_random"])
    [real] = out["matter_real"]
    assert real["generated_text"] == text and real["decoded"]
    assert _parse_cif(real["cif"]).composition == crystals[1].composition
