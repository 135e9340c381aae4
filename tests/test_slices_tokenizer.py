"""SlicesPlusTokenizer: vocabulary, canonical strings, round trips, HF save/load, fuzzed decoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystal_tokenizers.errors import CrystalDecodeError, MalformedSequenceError
from crystal_tokenizers.slices import codec
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer() -> SlicesPlusTokenizer:
    return SlicesPlusTokenizer()


def test_vocabulary_needs_no_files_and_follows_the_package_specials(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    vocab = tokenizer.get_vocab()
    assert len(vocab) == tokenizer.vocab_size == 5 + 103 + 64 + 3 + 26 + 13
    for token in ("Lr", "63", "o", "o1", "13s", "+"):
        assert token in vocab
    assert "64" not in vocab


def test_joined_labels_tokenize_into_the_vocabulary(tokenizer):
    ids = tokenizer("Sr P 0 1 -o+ 0 1 ooo")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Sr P 0 1 - o + 0 1 o o o"


def test_string_is_invariant_to_atom_order(tokenizer, sample_structures):
    rng = np.random.default_rng(0)
    for structure in sample_structures[:8]:
        shuffled = Structure.from_sites([structure[k] for k in rng.permutation(len(structure))])
        assert tokenizer.structure_to_string(shuffled) == tokenizer.structure_to_string(structure)


def test_augmented_strings_are_equivalent(tokenizer, sample_structures):
    structure = sample_structures[1]
    canonical = tokenizer.structure_to_string(structure)
    augmented = {tokenizer.structure_to_string(structure, augment=True, seed=seed) for seed in range(4)}
    assert len(augmented - {canonical}) >= 2
    for text in augmented:
        record = codec.parse_record(text)
        assert set(record.symops) == set(codec.parse_record(canonical).symops)
        assert tokenizer.string_graph_matches(canonical, tokenizer.string_to_structure(text))


def test_symmetry_part_is_the_published_rule(tokenizer, sample_structures):
    """The operations are SpacegroupAnalyzer's (pymatgen defaults) written with the letter tables."""
    for structure in sample_structures[:10]:
        text = tokenizer.structure_to_string(structure)
        groups = {tuple(text.split()[k:k + 6]) for k in range(len(text.split()) - 6 * len(codec.parse_record(text).symops), len(text.split()), 6)}
        expected = {
            codec.symop_from_matrices(op.rotation_matrix, op.translation_vector).tokens()
            for op in SpacegroupAnalyzer(structure).get_symmetry_operations()
        }
        assert groups == expected


def test_plain_slices_has_no_symmetry_part(sample_structures):
    text = SlicesPlusTokenizer(symmetry=False).structure_to_string(sample_structures[0])
    assert codec.parse_record(text).symops == ()


def test_round_trip_keeps_the_graph(tokenizer, sample_structures):
    structures = sample_structures[:12]
    decoded = tokenizer.strings_to_structures(tokenizer.structures_to_strings(structures))
    matches = [not isinstance(d, CrystalDecodeError) and tokenizer.graph_matches(s, d) for s, d in zip(structures, decoded)]
    assert sum(matches) >= 10, matches


def test_graph_matches_rejects_another_crystal(tokenizer, sample_structures):
    decoded = tokenizer.string_to_structure(tokenizer.structure_to_string(sample_structures[0]))
    assert not tokenizer.graph_matches(sample_structures[2], decoded)


def test_decode_structures_accepts_tensors_and_generate_output(tokenizer, sample_structures):
    ids = tokenizer.encode_structure(sample_structures[0], return_tensors="pt")["input_ids"]
    padded = torch.cat([ids, torch.full((1, 3), tokenizer.pad_token_id)], dim=1)
    batch = torch.cat([padded, torch.tensor([[1, 3, 2] + [0] * (padded.shape[1] - 3)])])
    for results in (tokenizer.decode_structures(batch), tokenizer.decode_structures(SimpleNamespace(sequences=batch))):
        assert isinstance(results[0], Structure) and len(results[0]) == len(sample_structures[0])
        assert isinstance(results[1], MalformedSequenceError)


def test_saved_tokenizer_loads_in_a_fresh_process(tokenizer, tmp_path, sample_structures):
    tokenizer.save_pretrained(tmp_path)
    text = tokenizer.structure_to_string(sample_structures[0])
    script = (
        "import json, sys; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True); "
        f"print(json.dumps([type(t).__name__, t.strategy, t({text!r})['input_ids']]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    name, strategy, ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "SlicesPlusTokenizer" and strategy == tokenizer.strategy
    assert ids == tokenizer(text)["input_ids"]


@given(st.lists(st.integers(min_value=0, max_value=213), min_size=1, max_size=80))
@settings(max_examples=40, deadline=None)
def test_fuzzed_ids_decode_to_a_structure_or_a_typed_error(ids):
    tokenizer = SlicesPlusTokenizer(decode_time_limit_s=2.0)
    result = tokenizer.decode_structures([ids])[0]
    assert isinstance(result, (Structure, CrystalDecodeError))


def test_lenient_decode_repairs_and_marks_the_structure(tokenizer, sample_structures):
    text = tokenizer.structure_to_string(sample_structures[0])
    n = len(codec.parse_record(text).graph.species)
    dangling = text.split()  # add an edge to a node beyond the element list and one dangling index
    k = next(i for i, t in enumerate(dangling) if t in codec.ROTATION_ROWS) if tokenizer.symmetry else len(dangling)
    dangling = " ".join(dangling[:k] + [str(n + 3), "0", "o", "o", "o", "1"] + dangling[k:])
    with pytest.raises(MalformedSequenceError, match=f"names node {n + 3}, but the string has {n} nodes"):
        tokenizer.string_to_structure(dangling)
    decoded = tokenizer.string_to_structure(dangling, lenient=True)
    assert len(decoded) == n and len(decoded.properties["slices_repairs"]) == 2
    assert "slices_repairs" not in tokenizer.string_to_structure(text, lenient=True).properties


def test_parallel_batch_decode_keeps_order_and_errors(tokenizer, sample_structures):
    texts = tokenizer.structures_to_strings(sample_structures[:3]) + ["Na Cl 0 5 o o o"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    serial = tokenizer.decode_structures(ids)
    parallel = tokenizer.decode_structures(ids, num_proc=2)
    assert isinstance(parallel[-1], MalformedSequenceError) and isinstance(serial[-1], MalformedSequenceError)
    for one, two in zip(serial[:3], parallel[:3]):
        assert np.allclose(one.frac_coords, two.frac_coords) and np.allclose(one.lattice.matrix, two.lattice.matrix)
