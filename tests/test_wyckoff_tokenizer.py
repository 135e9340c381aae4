"""WyckoffTokenizer's HuggingFace surface: ids, numeric_values alignment, save/load, remote code."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from crystal_tokenizers import MalformedSequenceError, WyckoffTokenizer
from crystal_tokenizers.roundtrip import default_matcher


def test_special_tokens_follow_the_package_convention():
    tokenizer = WyckoffTokenizer()
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.mask_token) == (
        "<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
    assert tokenizer.vocab_size == len(tokenizer) == len(set(tokenizer.get_vocab()))


def test_numeric_values_sit_on_num_tokens_and_survive_padding(sample_structures):
    tokenizer = WyckoffTokenizer()
    texts = [tokenizer.structure_to_string(s) for s in sample_structures[:4]]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        assert batch["numeric_values"].shape == batch["input_ids"].shape
        is_num = batch["input_ids"] == tokenizer.num_token_id
        assert torch.equal(~torch.isnan(batch["numeric_values"]), is_num)
        for row, text in enumerate(texts):
            expected = [float(w) for w in text.split() if w[0].isdigit() or w[0] in "-."]
            assert np.allclose(batch["numeric_values"][row][is_num[row]].numpy(), expected, atol=1e-5)


def test_truncation_keeps_values_aligned(sample_structures):
    tokenizer = WyckoffTokenizer()
    text = tokenizer.structure_to_string(sample_structures[0])
    encoding = tokenizer(text, truncation=True, max_length=20)
    assert len(encoding["input_ids"]) == len(encoding["numeric_values"]) == 20
    for token, value in zip(encoding["input_ids"], encoding["numeric_values"]):
        assert (token == tokenizer.num_token_id) == (not math.isnan(value))


def test_ids_decode_to_the_same_crystal(sample_structures):
    tokenizer = WyckoffTokenizer()
    batch = tokenizer([tokenizer.structure_to_string(s) for s in sample_structures[:5]], padding=True, return_tensors="pt")
    decoded = tokenizer.decode_structures(batch["input_ids"], batch["numeric_values"])
    matcher = default_matcher()
    assert all(matcher.fit(a, b) for a, b in zip(sample_structures[:5], decoded))


def test_batch_decoding_returns_per_item_errors(sample_structures):
    tokenizer = WyckoffTokenizer()
    good = tokenizer.structure_to_string(sample_structures[0])
    results = tokenizer.strings_to_structures([good, "<sep> sg:999", good])
    assert isinstance(results[0], Structure) and isinstance(results[2], Structure)
    assert isinstance(results[1], MalformedSequenceError)


def test_conditions_form_the_prefix_and_are_ignored_by_the_decoder():
    tokenizer = WyckoffTokenizer()
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.69), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    text = tokenizer.structure_to_string(
        nacl, crystal_system=True, space_group=True, elements=True, composition=True, e_above_hull=0.2,
        properties={"band_gap": 5.0},
    )
    prefix = text.split(" <sep> ")[0]
    assert prefix == ("cs:cubic sg:225 <elements> Na Cl <composition> Na n:4 Cl n:4 stab:high "
                      "prop:band_gap 5.000000")
    assert default_matcher().fit(tokenizer.string_to_structure(text), nacl)
    assert tokenizer.condition_prefix(crystal_system="cubic", elements=["Na", "Cl"]) == "cs:cubic <elements> Na Cl <sep>"


def test_saved_tokenizer_loads_in_a_fresh_process_with_remote_code(tmp_path, sample_structures):
    tokenizer = WyckoffTokenizer()
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenization_wyckoff.py").exists()
    text = tokenizer.structure_to_string(sample_structures[3])
    script = textwrap.dedent(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(tok).__name__ == "WyckoffTokenizer", type(tok)
        ids = tok({text!r}, return_tensors="pt")
        structure = tok.decode_structures(ids["input_ids"], ids["numeric_values"])[0]
        print(tok.structure_to_string(structure) == {text!r}, len(structure))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "True"


def test_round_trip_compares_elements_not_oxidation_states() -> None:
    from pymatgen.core import Species

    from crystal_tokenizers.roundtrip import round_trip

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.69), [Species("Na", 1), Species("Cl", -1)],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])
    report = round_trip(WyckoffTokenizer(), [nacl], ids=["nacl-ox"])
    assert (report.decoded, report.matched) == (1, 1)
    assert str(nacl.species[0]) == "Na+"  # the caller's structure is left as it was


def test_ids_to_text_with_values_reads_back_to_the_crystal() -> None:
    tokenizer = WyckoffTokenizer()
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.69), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    text = tokenizer.structure_to_string(nacl)
    batch = tokenizer([text])
    ids, values = batch["input_ids"][0], batch["numeric_values"][0]
    padded_ids = [*ids, tokenizer.pad_token_id]
    assert tokenizer.ids_to_text(padded_ids, [*values, math.nan]) == text
    assert default_matcher().fit(nacl, tokenizer.string_to_structure(tokenizer.ids_to_text(ids, values)))
