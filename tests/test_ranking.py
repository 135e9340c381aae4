"""Predictor-ranked sampling (bounded heap, streamed CSV, kept CIFs) and partial-condition strategies."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure

from crystal_tokenizers import CRYSTAL_SYSTEMS, crystal_system
from training.ranking import (
    CANDIDATES_CSV,
    KEPT_CSV,
    ConditionError,
    conditions_for_strategy,
    draw_conditions,
    generate_ranked,
)


def volume_per_atom(structures) -> np.ndarray:
    """A deterministic stand-in predictor: volume per atom (Å^3/atom)."""
    return np.array([s.volume / len(s) for s in structures])


def cycling_sampler(structures, every_nth_fails: int = 0):
    """``sample_fn`` that returns the given crystals in order, ``None`` for every n-th sample."""
    counter = itertools.count()
    stream = itertools.cycle(structures)
    sizes = []

    def sample_fn(size: int):
        sizes.append(size)
        out = []
        for _ in range(size):
            i, structure = next(counter), next(stream)
            out.append(None if every_nth_fails and i % every_nth_fails == every_nth_fails - 1 else structure)
        return out

    return sample_fn, sizes


def test_keeps_exactly_the_closest_candidates_and_streams_every_one(sample_structures, tmp_path):
    structures = sample_structures[:60]
    sample_fn, sizes = cycling_sampler(structures, every_nth_fails=7)
    target = 15.0
    result = generate_ranked(sample_fn, volume_per_atom, n=60, keep=10, target=target, batch_size=16, out_dir=tmp_path)
    assert sizes == [16, 16, 16, 12]
    decodable = [(i, s) for i, s in enumerate(structures) if i % 7 != 6]
    expected = sorted(decodable, key=lambda item: (abs(item[1].volume / len(item[1]) - target), item[0]))[:10]
    assert [k.index for k in result.kept] == [i for i, _ in expected]
    assert [k.deviation for k in result.kept] == sorted(k.deviation for k in result.kept)
    assert result.sampled == 60 and result.decoded == result.scored == len(decodable)
    streamed = pd.read_csv(tmp_path / CANDIDATES_CSV)
    assert len(streamed) == 60 and streamed["decoded"].sum() == len(decodable)
    kept_csv = pd.read_csv(tmp_path / KEPT_CSV)
    assert kept_csv["index"].tolist() == [k.index for k in result.kept]
    cifs = sorted((tmp_path / "kept").glob("rank_*.cif"))
    assert len(cifs) == 10
    first = Structure.from_file(cifs[0])
    assert first.composition.reduced_formula == expected[0][1].composition.reduced_formula


def test_nan_predictions_are_streamed_but_never_kept(sample_structures, tmp_path):
    def half_nan(structures):
        values = volume_per_atom(structures)
        values[::2] = np.nan
        return values

    sample_fn, _ = cycling_sampler(sample_structures[:20])
    result = generate_ranked(sample_fn, half_nan, n=20, keep=50, target=10.0, batch_size=20, out_dir=tmp_path)
    assert result.scored == 10 and len(result.kept) == 10
    assert all(k.index % 2 == 1 for k in result.kept)


def test_string_candidates_are_written_as_text(tmp_path):
    texts = ["Na Cl 0 1 o o o", "Cs Cl 0 1 + + +", "K Br 0 1 o o +"]
    result = generate_ranked(lambda size: texts[:size], lambda cands: np.array([len(c) for c in cands], float),
                             n=3, keep=1, target=15.0, batch_size=3, out_dir=tmp_path)
    assert result.kept[0].candidate == "Na Cl 0 1 o o o"
    assert pd.read_csv(tmp_path / KEPT_CSV)["text"].tolist() == ["Na Cl 0 1 o o o"]
    assert not (tmp_path / "kept").exists()


def test_sampler_returning_the_wrong_count_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="returned 1 candidates for a batch of 2"):
        generate_ranked(lambda size: ["x"], lambda c: np.zeros(len(c)), n=2, keep=1, target=0.0, batch_size=2,
                        out_dir=tmp_path)


@pytest.fixture(scope="module")
def condition_table(sample_table) -> pd.DataFrame:
    """Real MP-20 conditions: crystal system (from the space group), Ef (eV/atom), band gap (eV)."""
    return pd.DataFrame({
        "crystal_system": [crystal_system(int(n)) for n in sample_table["spacegroup.number"]],
        "formation_energy_per_atom": sample_table["formation_energy_per_atom"].astype(float),
        "band_gap": sample_table["band_gap"].astype(float),
    })


def test_partial_draw_with_one_neighbour_returns_the_nearest_crystal(condition_table):
    row = condition_table.iloc[42]
    given = {"formation_energy_per_atom": float(row.formation_energy_per_atom), "band_gap": float(row.band_gap)}
    drawn = draw_conditions(given, condition_table, np.random.default_rng(0), k=1)
    assert drawn == {"crystal_system": row.crystal_system, **given}


def test_partial_draw_respects_a_given_crystal_system(condition_table):
    rng = np.random.default_rng(1)
    cubic_energies = set(condition_table.formation_energy_per_atom[condition_table.crystal_system == "cubic"])
    for _ in range(20):
        drawn = draw_conditions({"crystal_system": "cubic"}, condition_table, rng)
        assert drawn["crystal_system"] == "cubic"
        assert drawn["formation_energy_per_atom"] in cubic_energies


def test_partial_draw_follows_the_conditional_distribution(condition_table):
    """Crystal systems drawn for a low Ef are those of the k training rows nearest in Ef."""
    target = float(condition_table.formation_energy_per_atom.quantile(0.02))
    nearest = condition_table.iloc[(condition_table.formation_energy_per_atom - target).abs().argsort()[:16]]
    rng = np.random.default_rng(2)
    drawn = {draw_conditions({"formation_energy_per_atom": target}, condition_table, rng)["crystal_system"]
             for _ in range(40)}
    assert drawn <= set(nearest.crystal_system) and drawn <= set(CRYSTAL_SYSTEMS)


def test_draw_is_reproducible_with_the_same_seed(condition_table):
    given = {"band_gap": 2.0}
    first = [draw_conditions(given, condition_table, np.random.default_rng(7)) for _ in range(3)]
    again = [draw_conditions(given, condition_table, np.random.default_rng(7)) for _ in range(3)]
    assert first == again


def test_strategies(condition_table):
    rng = np.random.default_rng(0)
    full = {"crystal_system": "cubic", "formation_energy_per_atom": -1.0, "band_gap": 0.5}
    assert conditions_for_strategy("default", {}, condition_table, rng) == {}
    assert conditions_for_strategy("full", full, condition_table, rng) == full
    partial = conditions_for_strategy("partial", {"band_gap": 0.5}, condition_table, rng)
    assert set(partial) == set(condition_table.columns) and partial["band_gap"] == 0.5
    with pytest.raises(ConditionError, match="missing"):
        conditions_for_strategy("full", {"band_gap": 0.5}, condition_table, rng)
    with pytest.raises(ConditionError, match="takes no conditions"):
        conditions_for_strategy("default", {"band_gap": 0.5}, condition_table, rng)
    with pytest.raises(ConditionError, match="strategy must be"):
        conditions_for_strategy("lucky", {}, condition_table, rng)


def test_draw_errors_name_the_problem(condition_table):
    rng = np.random.default_rng(0)
    with pytest.raises(ConditionError, match="unknown condition"):
        draw_conditions({"bulk_modulus_gpa": 100.0}, condition_table, rng)
    with pytest.raises(ConditionError, match="no training row has crystal_system = 'icosahedral'"):
        draw_conditions({"crystal_system": "icosahedral"}, condition_table, rng)
