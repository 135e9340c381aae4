"""The Wyckoff codec and its orbit table, on real MP-20 crystals and pyxtal crystals of all 230 groups."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystal_tokenizers.errors import (
    CrystalDecodeError,
    DisorderedStructureError,
    InvalidLatticeError,
    InvalidStructureError,
    InvalidWyckoffError,
    MalformedSequenceError,
    SymmetryAnalysisError,
    UnsupportedElementError,
)
from crystal_tokenizers.roundtrip import default_matcher, round_trip
from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from crystal_tokenizers.wyckoff import codec
from crystal_tokenizers.wyckoff.orbit_table import ORBIT_TABLE_JSON
from crystal_tokenizers.wyckoff.orbits import build_orbit_table_data, load_orbit_table, parse_triple


def test_shipped_orbit_table_equals_the_one_built_from_pyxtal():
    shipped = json.loads(ORBIT_TABLE_JSON)
    built = build_orbit_table_data()
    assert shipped == json.loads(json.dumps(built))
    assert built["n_wyckoff_positions"] == 1731
    assert built["n_orbit_tokens"] == len(load_orbit_table().tokens) == 940


def test_parse_triple():
    rotation, translation = parse_triple("x,2x,-z+1/2")
    assert rotation.tolist() == [[1, 0, 0], [2, 0, 0], [0, 0, -1]]
    assert translation.tolist() == [0, 0, 0.5]
    with pytest.raises(ValueError):
        parse_triple("x,y")


def test_rock_salt_string_is_exact():
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.69), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    text = WyckoffTokenizer().structure_to_string(nacl)
    # Fm-3m's 4a and 4b are the same point sets as F222's: the shared tokens are named after F222 (22).
    assert text == "<sep> sg:225 Na wp:4a@22 Cl wp:4b@22 <lat> a 5.690000"


def test_sample_round_trip_is_complete(sample_structures):
    report = round_trip(WyckoffTokenizer(), sample_structures)
    assert report.errors == {}
    assert report.matched == report.n == len(sample_structures)


def _assert_same_string(text: str, reference: str) -> None:
    """Same tokens; values equal to 1e-4 (in polar groups spglib fixes the free origin from noisy input)."""
    tokens, expected = codec.text_to_tokens(text), codec.text_to_tokens(reference)
    assert [t for t in tokens if isinstance(t, str)] == [t for t in expected if isinstance(t, str)]
    values = np.array([t for t in tokens if not isinstance(t, str)])
    expected_values = np.array([t for t in expected if not isinstance(t, str)])
    assert np.allclose(values, expected_values, atol=1e-4)


def test_string_is_invariant_to_atom_order_cell_choice_and_rotation(sample_structures):
    tokenizer = WyckoffTokenizer()
    rng = np.random.default_rng(0)
    for structure in sample_structures[:40]:
        reference = tokenizer.structure_to_string(structure)
        permuted = Structure.from_sites([structure[i] for i in rng.permutation(len(structure))])
        _assert_same_string(tokenizer.structure_to_string(permuted), reference)
        rotated = Structure(
            Lattice(structure.lattice.matrix @ _rotation_matrix(rng)), structure.species, structure.frac_coords
        )
        _assert_same_string(tokenizer.structure_to_string(rotated), reference)
        supercell = structure.copy()
        supercell.make_supercell([1, 1, 2])
        assert default_matcher().fit(tokenizer.string_to_structure(tokenizer.structure_to_string(supercell)), structure)


def _rotation_matrix(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_values_in_text_are_exact_to_1e_4(sample_structures):
    for structure in sample_structures[:30]:
        crystal = codec.structure_to_crystal(structure)
        parsed = codec.tokens_to_crystal(codec.text_to_tokens(codec.tokens_to_text(codec.crystal_to_tokens(crystal))))
        assert parsed.space_group == crystal.space_group
        assert np.allclose(parsed.lattice_values, crystal.lattice_values, atol=1e-4)
        for a, b in zip(parsed.orbits, crystal.orbits):
            assert (a.element, a.token) == (b.element, b.token)
            assert np.allclose(a.free_values, b.free_values, atol=1e-4)
            assert all(0.0 <= v < 1.0 for v in a.free_values)


def _random_crystal(space_group: int, seed: int) -> Structure:
    """A pyxtal crystal whose symmetry at the encoding tolerance is exactly ``space_group``."""
    import spglib
    from pyxtal import pyxtal

    general = load_orbit_table().positions[space_group][0].multiplicity
    for attempt in range(50):
        crystal = pyxtal()
        try:
            crystal.from_random(3, space_group, ["Mg", "O"], [general, general], factor=1.3,
                                random_state=seed * 100 + attempt)
        except Exception:  # pyxtal gives up on some random draws; try the next seed
            continue
        structure = crystal.to_pymatgen()
        cell = (structure.lattice.matrix, structure.frac_coords, structure.atomic_numbers)
        if crystal.valid and spglib.get_symmetry_dataset(cell, symprec=codec.DEFAULT_SYMPREC).number == space_group:
            return structure
    raise RuntimeError(f"pyxtal could not build a crystal of exactly space group {space_group}")


@pytest.mark.slow
def test_one_random_crystal_per_space_group_round_trips():
    tokenizer = WyckoffTokenizer()
    matcher = default_matcher()
    failures = []
    for space_group in range(1, 231):
        structure = _random_crystal(space_group, seed=space_group)
        text = tokenizer.structure_to_string(structure)
        decoded = tokenizer.string_to_structure(text)
        if text.split()[1] != f"sg:{space_group}" or not matcher.fit(structure, decoded):
            failures.append((space_group, text.split()[1], matcher.fit(structure, decoded)))
    assert failures == []


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]]), DisorderedStructureError),
        (lambda: Structure(Lattice.cubic(4.0), [], []), InvalidStructureError),
        (lambda: Structure(Lattice.cubic(4.0), ["Fe"], [[np.nan, 0, 0]]), InvalidStructureError),
        (lambda: Structure(Lattice.cubic(4.0), ["X"], [[0, 0, 0]]), UnsupportedElementError),
        (lambda: "not a structure", InvalidStructureError),
        (lambda: Structure(Lattice.cubic(4.0), ["Fe", "Fe"], [[0, 0, 0], [1e-4, 0, 0]]), SymmetryAnalysisError),
    ],
    ids=["disordered", "empty", "nan", "dummy-species", "no-lattice", "overlapping"],
)
def test_bad_input_raises_a_typed_encode_error(make, error):
    with pytest.raises(error):
        WyckoffTokenizer().structure_to_string(make())


def test_batch_encoding_keeps_good_items(sample_structures):
    bad = Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    results = WyckoffTokenizer().structures_to_strings([sample_structures[0], bad, sample_structures[1]])
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert isinstance(results[1], DisorderedStructureError)


@pytest.mark.parametrize(
    "text, error",
    [
        ("", MalformedSequenceError),
        ("<sep> Na wp:4a@22", MalformedSequenceError),
        ("<sep> sg:225 Na wp:4a@22 <lat>", MalformedSequenceError),
        ("<sep> sg:225 Na wp:1a@1 <lat> a 5.0", InvalidWyckoffError),
        ("<sep> sg:225 Na wp:4a@22 Cl wp:4a@22 <lat> a 5.0", InvalidWyckoffError),
        ("<sep> sg:225 Na wp:4a@22 <lat> a -5.0", InvalidLatticeError),
        ("<sep> sg:2 Na wp:1a@2 <lat> a 5 b 5 c 5 alpha 120 beta 120 gamma 120", InvalidLatticeError),
        ("<sep> sg:225 Na wp:4a@22 <lat> a 5.0 x 0.1", MalformedSequenceError),
        ("<sep> sg:221 Na wp:6f@195 <lat> a 5.0 x 0.0", InvalidWyckoffError),
    ],
    ids=["empty", "no-group", "no-lattice-value", "foreign-orbit", "fixed-orbit-twice", "negative-length",
         "impossible-angles", "trailing", "collapsed-orbit"],
)
def test_bad_strings_raise_typed_decode_errors(text, error):
    with pytest.raises(error):
        WyckoffTokenizer().string_to_structure(text)


def test_ten_thousand_fuzzed_sequences_decode_or_raise_decode_errors(sample_structures):
    """Random edits of real sequences plus random token soup: a Structure or a CrystalDecodeError, nothing else."""
    tokenizer = WyckoffTokenizer()
    vocabulary = list(tokenizer.get_vocab())
    rng = np.random.default_rng(1)
    seeds = [codec.text_to_tokens(tokenizer.structure_to_string(s)) for s in sample_structures[:50]]
    outcomes = {"structure": 0, "error": 0}
    for trial in range(10_000):
        if trial % 10 == 0:
            tokens = [vocabulary[i] for i in rng.integers(0, len(vocabulary), rng.integers(0, 40))]
        else:
            tokens = list(seeds[trial % len(seeds)])
            for _ in range(rng.integers(1, 4)):
                position = int(rng.integers(0, len(tokens) + 1))
                edit = rng.integers(0, 4)
                replacement = vocabulary[int(rng.integers(0, len(vocabulary)))] if edit < 2 else float(rng.normal(0, 50))
                if edit == 0 and tokens:
                    tokens.pop(min(position, len(tokens) - 1))
                elif position < len(tokens) and edit in (1, 2):
                    tokens[position] = replacement
                else:
                    tokens.insert(position, replacement)
        try:
            result = codec.crystal_to_structure(codec.tokens_to_crystal(tokens))
        except CrystalDecodeError:
            outcomes["error"] += 1
        else:
            assert isinstance(result, Structure)
            outcomes["structure"] += 1
    assert outcomes["structure"] > 100 and outcomes["error"] > 100
