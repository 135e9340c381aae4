"""`crystal-lm decode --tokenizer slices-plus`: per-item results, JSON summary, CIFs."""

from __future__ import annotations

import json

import pandas as pd
from pymatgen.core import Structure

from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer
from training.cli import main
from crystal_tokenizers import structure_crystal_system


def test_decode_command_reports_json_and_writes_cifs(tmp_path, capsys, sample_structures):
    tokenizer = SlicesPlusTokenizer()
    structures = sample_structures[:4]
    texts = tokenizer.structures_to_strings(structures) + ["Na Cl 0 5 o o o"]  # the last one is malformed
    labels = ["cubic" if structure_crystal_system(s) == "cubic" else 6 for s in structures] + [0]
    csv = tmp_path / "strings.csv"
    pd.DataFrame({"slices_plus": texts, "crystal_system": labels}).to_csv(csv, index=False)
    code = main(["decode", "--tokenizer", "slices-plus", str(csv), "--column", "slices_plus", "--json",
                 "--out", str(tmp_path / "cifs")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"n", "decoded", "valid", "by_crystal_system", "decode_per_s"} <= result.keys()
    assert result["n"] == 5 and result["decoded"] == 4 and result["errors"] == {"MalformedSequenceError": 1}
    assert 3 <= result["valid"] <= 4
    assert sum(v["n"] for v in result["by_crystal_system"].values()) == 5
    cifs = sorted((tmp_path / "cifs").glob("*.cif"))
    assert len(cifs) == 4 and len(Structure.from_file(cifs[0])) == len(structures[0])


def test_plain_slices_column_decodes(tmp_path, capsys, sample_structures):
    texts = SlicesPlusTokenizer(symmetry=False).structures_to_strings(sample_structures[:2])
    csv = tmp_path / "plain.csv"
    pd.DataFrame({"slices": texts}).to_csv(csv, index=False)
    assert main(["decode", "--tokenizer", "slices", str(csv), "--column", "slices", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["decoded"] == 2 and result["by_crystal_system"] == {}
