"""A CSV with bad rows through roundtrip / evaluate / decode / prepare-data: every bad row named, no traceback."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Lattice, Species, Structure

from crystal_tokenizers import SlicesPlusTokenizer, WyckoffTokenizer
from training.cli import main
from training.io import parse_cif, read_structures

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"
GOOD = 3
BAD_REASONS = {
    "bad-empty": "InvalidStructureError: empty CIF",
    "bad-partial": "DisorderedStructureError: .*partial occupancies",
    "bad-nan": "InvalidStructureError: CIF could not be parsed: .*NaN",
    "bad-xx": "UnsupportedElementError: .*not chemical elements",
    "bad-zero-volume": "InvalidStructureError: CIF could not be parsed: Singular matrix",
}


def _real(table: pd.DataFrame, index: int) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(table.cif[index], fmt="cif")


@pytest.fixture(scope="module")
def bad_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real crystals, five broken ones made from a real crystal, and a real crystal as a 500-atom supercell."""
    table = pd.read_csv(SAMPLE)
    base = _real(table, 0)
    cif = base.to(fmt="cif")
    lines = cif.splitlines()
    site = next(k for k, line in enumerate(lines) if line.split()[:1] == [base[0].specie.symbol] and len(line.split()) >= 7)
    nan_lines, xx_lines = list(lines), list(lines)
    parts = nan_lines[site].split()
    parts[3] = "nan"
    nan_lines[site] = "  ".join(parts)
    parts = xx_lines[site].split()
    parts[:2] = ["Xx", "Xx0"]
    xx_lines[site] = "  ".join(parts)
    partial = base.copy()
    partial.replace(0, {"Na": 0.5, "K": 0.5})
    small = _real(table, 1)
    assert len(small) == 4
    rows = [(table.material_id[i], table.cif[i]) for i in range(GOOD)] + [
        ("bad-empty", ""),
        ("bad-partial", partial.to(fmt="cif")),
        ("bad-nan", "\n".join(nan_lines) + "\n"),
        ("bad-xx", "\n".join(xx_lines) + "\n"),
        ("bad-zero-volume", re.sub(r"_cell_length_c\s+\S+", "_cell_length_c   0.0", cif)),
        ("big-500-atoms", (small * (5, 5, 5)).to(fmt="cif")),
    ]
    path = tmp_path_factory.mktemp("bad") / "bad.csv"
    pd.DataFrame(rows, columns=["material_id", "cif"]).to_csv(path, index=False)
    return path


def _assert_bad_rows_named(text: str) -> None:
    for row, reason in BAD_REASONS.items():
        assert re.search(rf"{row}: (parse )?{reason}", text), f"{row} not named with its reason in:\n{text}"
    assert "Traceback" not in text


def test_read_structures_names_every_bad_row(bad_csv: Path) -> None:
    loaded = read_structures(bad_csv)
    failures = {f["id"]: f"{f['error']}: {f['message']}" for f in loaded.failures()}
    assert set(failures) == set(BAD_REASONS)
    _assert_bad_rows_named("\n".join(f"{k}: {v}" for k, v in failures.items()))
    assert sum(s is not None for s in loaded.structures) == GOOD + 1
    assert len(loaded.structures[-1]) == 500


@pytest.mark.parametrize("tokenizer", ["wyckoff", "slices-plus"])
def test_roundtrip_names_bad_rows_and_processes_good_ones(bad_csv: Path, tokenizer: str, capsys) -> None:
    assert main(["roundtrip", "--tokenizer", tokenizer, str(bad_csv), "--json"]) == 0
    captured = capsys.readouterr()
    _assert_bad_rows_named(captured.err)
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["n"] == GOOD + 1 + len(BAD_REASONS)
    assert result["encoded"] >= GOOD
    assert {f["id"] for f in result["failures"] if f["stage"] == "parse"} == set(BAD_REASONS)
    if tokenizer == "wyckoff":  # the 500-atom supercell is found to be its 4-atom cell
        assert result["matched"] == GOOD + 1
    else:  # beyond the graph size limit: named as an encode failure
        assert any(f["id"] == "big-500-atoms" and f["stage"] == "encode" for f in result["failures"])


def test_evaluate_names_bad_rows(bad_csv: Path, capsys) -> None:
    assert main(["evaluate", str(bad_csv), "--json"]) == 0
    captured = capsys.readouterr()
    _assert_bad_rows_named(captured.err)
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["n"] == GOOD + 1 + len(BAD_REASONS) and result["n_parsed"] == GOOD + 1
    assert {f["id"] for f in result["failures"]} == set(BAD_REASONS)


def test_prepare_data_names_bad_rows(bad_csv: Path, tmp_path: Path, capsys) -> None:
    assert main(["prepare-data", str(bad_csv), "--out", str(tmp_path / "prepared")]) == 0
    captured = capsys.readouterr()
    _assert_bad_rows_named(captured.err)
    report = json.loads((tmp_path / "prepared" / "prepare_report.json").read_text())
    assert sum(report["split_counts"].values()) == GOOD + 1
    assert {f["material_id"] for f in report["failures"]} == set(BAD_REASONS)


@pytest.mark.parametrize("name,column", [("wyckoff", "wyckoff"), ("slices-plus", "slices_plus")])
def test_decode_names_bad_rows(name: str, column: str, tmp_path: Path, capsys) -> None:
    table = pd.read_csv(SAMPLE)
    tokenizer = WyckoffTokenizer() if name == "wyckoff" else SlicesPlusTokenizer()
    texts = [tokenizer.structure_to_string(_real(table, i)) for i in range(GOOD)]
    unknown_element = texts[0].replace(" O wp", " Xx wp", 1) if name == "wyckoff" else "Xx" + texts[0][2:]
    bad = {"bad-empty": "", "bad-truncated": texts[0][:15], "bad-unknown-element": unknown_element}
    assert unknown_element != texts[0]
    frame = pd.DataFrame({"material_id": [*table.material_id[:GOOD], *bad], column: [*texts, *bad.values()]})
    frame.to_csv(tmp_path / "texts.csv", index=False)
    assert main(["decode", "--tokenizer", name, "--column", column, str(tmp_path / "texts.csv"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["n"] == GOOD + len(bad) and result["decoded"] == GOOD
    assert {f["id"] for f in result["failures"]} == set(bad)
    assert all(f["error"] == "MalformedSequenceError" for f in result["failures"])
    assert "bad-empty: MalformedSequenceError: empty cell" in captured.err and "Traceback" not in captured.err


def test_oxidation_states_are_removed_so_round_trips_compare_elements(tmp_path: Path, capsys) -> None:
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.69), [Species("Na", 1), Species("Cl", -1)],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])
    cif = nacl.to(fmt="cif")
    assert "Na+" in cif
    assert {str(e) for e in parse_cif(cif).composition} == {"Na", "Cl"}
    pd.DataFrame({"material_id": ["nacl-ox"], "cif": [cif]}).to_csv(tmp_path / "ox.csv", index=False)
    assert main(["roundtrip", str(tmp_path / "ox.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["matched"] == 1
