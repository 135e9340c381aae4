"""Tests of training/evaluate.py and `crystal-lm evaluate`: each metric on cases with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from training import cli
from training.evaluate import (
    crystal_system_of,
    duplicate_of,
    energies_above_hull,
    evaluate_structures,
    fit_elemental_energies,
    is_compositionally_valid,
    is_novel,
    is_structurally_valid,
    normalize_crystal_system,
    spacegroup_number,
    structures_match,
    write_report,
)
from training.io import read_structures

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return pd.read_csv(SAMPLE)


@pytest.fixture(scope="module")
def sample_structures(sample: pd.DataFrame) -> list[Structure]:
    return [Structure.from_str(cif, fmt="cif") for cif in sample.cif[:120]]


def rock_salt(a: float = 5.64) -> Structure:
    """NaCl, rock salt (Fm-3m, a = 5.64 Å), conventional cell of 8 atoms."""
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


# --- structural validity ------------------------------------------------------------------------


def test_rock_salt_is_structurally_valid() -> None:
    assert is_structurally_valid(rock_salt())


def test_overlapping_atoms_are_invalid() -> None:
    crystal = rock_salt()
    crystal.append("Na", crystal[0].coords + np.array([0.3, 0.0, 0.0]), coords_are_cartesian=True)
    assert not is_structurally_valid(crystal)


def test_overlap_across_the_cell_boundary_is_found() -> None:
    """Two atoms 0.4 Å apart only through a periodic image (0.01 and 0.99 of a 20 Å axis)."""
    crystal = Structure(Lattice.cubic(20.0), ["Na", "Cl"], [[0.01, 0.5, 0.5], [0.99, 0.5, 0.5]])
    assert crystal.get_distance(0, 1, jimage=(0, 0, 0)) > 19.0
    assert not is_structurally_valid(crystal)
    assert is_structurally_valid(crystal, min_distance=0.3)


def test_an_atom_too_close_to_its_own_image_is_invalid() -> None:
    crystal = Structure(Lattice.orthorhombic(0.45, 5.0, 5.0), ["Cu"], [[0, 0, 0]])
    assert not is_structurally_valid(crystal)


def test_real_crystals_are_structurally_valid(sample_structures: list[Structure]) -> None:
    assert all(is_structurally_valid(s) for s in sample_structures)


# --- compositional validity ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("NaCl", True),
        ("NaCl2", False),
        ("Fe2O3", True),
        ("NaO3", False),
        ("Si", True),  # a single element is valid (CDVAE)
        ("Cu3Au", True),  # all metals: an alloy, valid (CDVAE)
    ],
)
def test_smact_charge_neutrality(formula: str, expected: bool) -> None:
    from pymatgen.core import Composition

    assert is_compositionally_valid(Composition(formula)) is expected


# --- symmetry -----------------------------------------------------------------------------------


def test_crystal_systems_of_space_groups() -> None:
    expected = {1: "triclinic", 2: "triclinic", 3: "monoclinic", 15: "monoclinic", 16: "orthorhombic",
                74: "orthorhombic", 75: "tetragonal", 142: "tetragonal", 143: "trigonal", 167: "trigonal",
                168: "hexagonal", 194: "hexagonal", 195: "cubic", 230: "cubic"}  # fmt: skip
    assert {sg: crystal_system_of(sg) for sg in expected} == expected
    with pytest.raises(ValueError, match="231"):
        crystal_system_of(231)
    assert normalize_crystal_system(0) == "cubic"
    assert normalize_crystal_system("6") == "triclinic"
    assert normalize_crystal_system("Hexagonal") == "hexagonal"
    with pytest.raises(ValueError, match="rhombic"):
        normalize_crystal_system("rhombic")


def test_spacegroup_consistency_and_crystal_system_hit_rate() -> None:
    crystals = [rock_salt(), rock_salt(5.0)]
    assert spacegroup_number(crystals[0]) == 225
    report = evaluate_structures(crystals, targets={"spacegroup": [225, 221], "crystal_system": [0, "hexagonal"]})
    assert report.spg_consistency == pytest.approx(0.5)
    assert report.crystal_system_hit_rate == pytest.approx(0.5)
    assert [r.crystal_system for r in report.records] == ["cubic", "cubic"]
    no_targets = evaluate_structures(crystals)
    assert no_targets.spg_consistency is None and no_targets.crystal_system_hit_rate is None


# --- uniqueness and novelty ---------------------------------------------------------------------


def test_supercell_is_not_unique_against_its_primitive_cell() -> None:
    primitive = rock_salt().get_primitive_structure()
    assert len(primitive) == 2
    supercell = primitive.make_supercell([2, 1, 1], in_place=False)
    assert duplicate_of([primitive, supercell, rock_salt(5.0 * 1.3)]) == [None, 0, 0]
    report = evaluate_structures([primitive, supercell])
    assert report.uniqueness == pytest.approx(0.5)


def test_a_crystal_is_not_novel_against_another_setting_of_itself(sample_structures: list[Structure]) -> None:
    crystal = next(s for s in sample_structures if SpacegroupAnalyzer(s).get_space_group_number() == 225)
    conventional = SpacegroupAnalyzer(crystal).get_conventional_standard_structure()
    assert len(conventional) > len(crystal)
    rotated = conventional.copy()
    rotated.apply_operation(_rotation_about_z(0.7))
    permuted = Structure.from_sites(list(reversed(rotated.sites)))
    others = [s for s in sample_structures[:60] if s.composition.reduced_formula != crystal.composition.reduced_formula]
    assert is_novel([crystal], [*others, permuted]) == [False]
    assert is_novel([crystal], others) == [True]


def _rotation_about_z(angle_rad: float):
    from pymatgen.core.operations import SymmOp

    return SymmOp.from_axis_angle_and_translation((0, 0, 1), angle_rad, angle_in_radians=True)


def test_composition_prefilter_gives_the_same_classes_as_plain_grouping(sample_structures: list[Structure]) -> None:
    """Duplicates added in other cells must be found, and the class count equals pymatgen's grouping."""
    crystals = sample_structures[:40] + [s.make_supercell([1, 1, 2], in_place=False) for s in sample_structures[:5]]
    labels = duplicate_of(crystals)
    assert labels[40:] == [0, 1, 2, 3, 4]
    assert sum(label is None for label in labels) == len(StructureMatcher().group_structures(crystals))


def test_a_match_in_either_order_counts(sample: pd.DataFrame) -> None:
    """StructureMatcher fits this generated cubic LiHg3 (BiF3 type) to MP-20's tetragonal mp-1185337 only
    with the generated crystal first; novelty and uniqueness must not depend on the order."""
    reference = Structure.from_str(sample.set_index("material_id").cif["mp-1185337"], fmt="cif")
    generated = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(6.7427), ["Li", "Hg", "Hg"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    )
    matcher = StructureMatcher()
    assert matcher.fit(generated, reference) and not matcher.fit(reference, generated)
    assert structures_match(matcher, reference, generated)
    assert is_novel([generated], [reference]) == [False]
    assert duplicate_of([reference, generated]) == [None, 0]
    assert duplicate_of([generated, reference]) == [None, 0]


def test_novelty_against_the_training_rows(sample: pd.DataFrame, sample_structures: list[Structure]) -> None:
    generated = sample_structures[:20]
    report = evaluate_structures(generated, reference=sample_structures[10:120])
    novel = [r.novel for r in report.records if r.structurally_valid and r.compositionally_valid]
    valid = [r.index for r in report.records if r.structurally_valid and r.compositionally_valid]
    assert novel == [i < 10 for i in valid]
    assert report.novelty == pytest.approx(sum(i < 10 for i in valid) / len(valid))


# --- properties and stability -------------------------------------------------------------------


def test_property_targets_with_a_predictor() -> None:
    crystals = [rock_salt(5.64), rock_salt(6.0)]

    def density(structures):  # g/cm³, a stand-in for a trained property predictor
        return np.array([s.density for s in structures])

    report = evaluate_structures(crystals, targets={"density": 2.0}, predictors={"density": density})
    expected = np.mean([abs(s.density - 2.0) for s in crystals])
    assert report.properties["density"]["mean_abs_deviation"] == pytest.approx(expected)
    assert report.records[0].predicted["density"] == pytest.approx(crystals[0].density)


def test_energy_above_hull_from_a_reference_hull() -> None:
    """Hull of Na (0 eV/atom), Cl (0 eV/atom) and NaCl (-2 eV/atom): NaCl at -1.5 is 0.5 eV/atom above."""
    na = Structure(Lattice.cubic(4.23), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cl = Structure(Lattice.cubic(6.0), ["Cl"], [[0, 0, 0]])
    reference = [na, cl, rock_salt()]
    hull = energies_above_hull([rock_salt(5.5), na], np.array([-1.5, 0.1]), reference, np.array([0.0, 0.0, -2.0]))
    assert hull == pytest.approx([0.5, 0.1])
    no_terminal = energies_above_hull([rock_salt()], np.array([-1.0]), [rock_salt()], np.array([-2.0]))
    assert np.isnan(no_terminal[0])
    only_sodium = energies_above_hull([rock_salt()], np.array([-1.0]), [na], np.array([0.0]))
    assert np.isnan(only_sodium[0])


def test_energy_metrics_with_an_energy_model() -> None:
    energies = {"Na": 0.0, "Cl": 0.0, "Cl-Na": -2.0}  # eV/atom by chemical system
    reference = [
        Structure(Lattice.cubic(4.23), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        Structure(Lattice.cubic(6.0), ["Cl"], [[0, 0, 0]]),
    ]

    def model(structures):
        return np.array([energies[s.composition.chemical_system] for s in structures])

    report = evaluate_structures([rock_salt()], reference=reference, energy_model=model)
    assert report.records[0].e_above_hull_ev == pytest.approx(-2.0)  # below the Na-Cl tie line at 0 eV/atom
    assert report.energy["stable_fraction"] == 1.0 and report.energy["sun_rate"] == 1.0


def test_chgnet_energy_of_rock_salt() -> None:
    from training.evaluate import chgnet_energy_per_atom

    energy = chgnet_energy_per_atom([rock_salt()])
    assert energy.shape == (1,) and -4.5 < energy[0] < -3.0  # MP (PBE) NaCl: about -3.4 eV/atom


# --- inputs, report, command line ---------------------------------------------------------------


def _small_csv(sample: pd.DataFrame, path: Path) -> Path:
    rows = sample.head(6).copy()
    rows.loc[rows.index[5], "cif"] = "data_broken\n_cell_length_a 1\n"
    rows["spacegroup"] = rows["spacegroup.number"]
    rows.to_csv(path, index=False)
    return path


def test_bad_cifs_are_counted_not_raised(sample: pd.DataFrame, tmp_path: Path) -> None:
    structures = read_structures(_small_csv(sample, tmp_path / "gen.csv"))
    assert len(structures.structures) == 6 and structures.structures[5] is None
    report = evaluate_structures(structures.structures, parse_errors=structures.errors)
    assert report.n == 6 and report.n_parsed == 5
    assert sum(report.parse_errors.values()) == 1
    assert report.structural_validity == pytest.approx(5 / 6)


def test_write_report_writes_json_png_and_markdown(sample_structures: list[Structure], tmp_path: Path) -> None:
    report = evaluate_structures(sample_structures[:10], reference=sample_structures[10:30])
    paths = write_report(report, tmp_path / "out")
    assert {p.name for p in paths} >= {"metrics.json", "summary.md", "hist_element.png", "hist_spacegroup.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["novelty"] == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "out" / "per_structure.json").read_text())) == 10


def test_cli_json_contract(sample: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generated = _small_csv(sample, tmp_path / "gen.csv")
    reference = tmp_path / "ref.csv"
    sample.iloc[3:40].to_csv(reference, index=False)
    code = cli.main(["evaluate", str(generated), "--reference", str(reference), "--json", "--out", str(tmp_path / "o")])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 6
    for key in ("structural_validity", "compositional_validity", "uniqueness", "novelty", "spg_consistency"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["spg_consistency"] == pytest.approx(1.0)
    assert result["n_valid_samples"] == 5  # rows 0-4 are valid MP-20 crystals, row 5 is a broken CIF
    assert result["novelty"] == pytest.approx(3 / 5)  # rows 3 and 4 are in the reference
    assert (tmp_path / "o" / "summary.md").exists()


def test_cli_json_without_reference_or_groups(
    sample: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cifs"
    folder.mkdir()
    for material_id, cif in zip(sample.material_id[:3], sample.cif[:3], strict=True):
        (folder / f"{material_id}.cif").write_text(cif)
    (folder / "bad.cif").write_text("not a cif")
    assert cli.main(["evaluate", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["novelty"] is None and result["spg_consistency"] is None
    assert result["structural_validity"] == pytest.approx(0.75)


def test_write_report_draws_property_density_maps(sample_structures: list[Structure], tmp_path: Path) -> None:
    predictors = {
        "bulk_modulus_gpa": lambda structures: np.array([30.0 * s.density for s in structures]),
        "shear_modulus_gpa": lambda structures: np.array([4.0 * s.volume / len(s) for s in structures]),
    }
    targets = {"bulk_modulus_gpa": 200.0, "shear_modulus_gpa": [100.0 + i for i in range(30)]}
    report = evaluate_structures(sample_structures[:30], targets=targets, predictors=predictors)
    names = {p.name for p in write_report(report, tmp_path)}
    assert {"density_bulk_modulus_gpa.png", "density_shear_modulus_gpa.png"} <= names
    assert "density_bulk_modulus_gpa_vs_shear_modulus_gpa.png" in names
    assert "bulk_modulus_gpa: median_predicted" in (tmp_path / "summary.md").read_text()


def test_fitted_elemental_energies_complete_the_hull() -> None:
    """Reference energies built from known mu (Na -1.3, Cl -1.8, O -4.9 eV/atom) and formation energies."""
    mu = {"Na": -1.3, "Cl": -1.8, "O": -4.9}
    nacl, na2o = rock_salt(), Structure(Lattice.cubic(5.55), ["Na"] * 2 + ["O"], [[0.25] * 3, [0.75] * 3, [0, 0, 0]])
    naclo = Structure(Lattice.cubic(5.0), ["Na", "Cl", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])
    reference = [nacl, na2o, naclo]
    formation = np.array([-2.0, -1.4, -1.0])
    energies = np.array([f + sum(mu[el.symbol] * x for el, x in s.composition.fractional_composition.items())
                         for s, f in zip(reference, formation)])  # fmt: skip
    fitted, rms = fit_elemental_energies(reference, energies, formation)
    assert fitted == pytest.approx(mu) and rms == pytest.approx(0.0, abs=1e-9)
    underdetermined, _ = fit_elemental_energies(reference[:1], energies[:1], formation[:1])
    assert underdetermined == {}  # one equation cannot separate mu_Na from mu_Cl
    generated_energy = np.array([-2.0 + (mu["Na"] + mu["Cl"]) / 2 + 0.25])  # NaCl 0.25 eV/atom above its hull point
    assert np.isnan(energies_above_hull([rock_salt(5.5)], generated_energy, reference, energies)[0])
    hull = energies_above_hull([rock_salt(5.5)], generated_energy, reference, energies, fitted)
    assert hull == pytest.approx([0.25])


def test_cli_reports_a_missing_cif_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pd.DataFrame({"structure": ["x"]}).to_csv(tmp_path / "gen.csv", index=False)
    assert cli.main(["evaluate", str(tmp_path / "gen.csv"), "--json"]) == 2
    assert "no column 'cif'" in capsys.readouterr().err
