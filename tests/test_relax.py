"""The optional ML-potential relaxation step of SLICES decoding (training.relax) and round_trip's hook."""

from __future__ import annotations

import pytest
from pymatgen.core import Lattice, Structure

from crystal_tokenizers import SlicesPlusTokenizer
from crystal_tokenizers.roundtrip import round_trip
from training.relax import graph_preserving_relaxer


@pytest.fixture(scope="module")
def rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_relaxed_crystal_kept_only_while_its_graph_matches(rocksalt):
    tokenizer = SlicesPlusTokenizer()
    text = tokenizer.structure_to_string(rocksalt.get_primitive_structure())
    decoded = tokenizer.string_to_structure(text)
    strained = decoded.copy()
    strained.scale_lattice(decoded.volume * 1.1)  # same net, other cell: kept
    assert graph_preserving_relaxer(tokenizer, lambda s: strained)(text, decoded) is strained
    broken = decoded.copy()
    broken.translate_sites([0], [0.4, 0.1, 0.0])  # a different net: the unrelaxed decode is returned
    assert not tokenizer.string_graph_matches(text, broken)
    assert graph_preserving_relaxer(tokenizer, lambda s: broken)(text, decoded) is decoded

    def failing(structure: Structure) -> Structure:
        raise ValueError("no graph")

    assert graph_preserving_relaxer(tokenizer, failing)(text, decoded) is decoded


def test_round_trip_applies_refine_to_every_decode(rocksalt):
    seen: list[str] = []

    def refine(text: str, decoded: Structure) -> Structure:
        seen.append(text)
        return decoded

    report = round_trip(SlicesPlusTokenizer(), [rocksalt, rocksalt.get_primitive_structure()], refine=refine)
    assert len(seen) == 2 and report.matched == 2 and report.graph_matched == 2


def test_chgnet_relaxation_keeps_rocksalt(rocksalt):
    from training.relax import chgnet_relaxer

    tokenizer = SlicesPlusTokenizer()
    text = tokenizer.structure_to_string(rocksalt.get_primitive_structure())
    relaxed = graph_preserving_relaxer(tokenizer, chgnet_relaxer(steps=50))(text, tokenizer.string_to_structure(text))
    assert tokenizer.string_graph_matches(text, relaxed)
    assert 4.0 < relaxed.lattice.abc[0] * 2**0.5 < 7.0  # conventional NaCl edge near 5.6 Å


def test_a_trajectory_that_breaks_the_graph_gives_its_latest_frame_that_holds_it(rocksalt):
    from training.relax import latest_holding_frame

    tokenizer = SlicesPlusTokenizer()
    text = tokenizer.structure_to_string(rocksalt.get_primitive_structure())
    decoded = tokenizer.string_to_structure(text)
    frames = []
    for k in range(9):  # the cell swells, then a site leaves its place: frames 0-5 hold the graph, 6-8 do not
        frame = decoded.copy()
        frame.scale_lattice(decoded.volume * (1 + 0.02 * k))
        if k >= 6:
            frame.translate_sites([0], [0.4, 0.1, 0.0])
        frames.append(frame)
    assert [tokenizer.string_graph_matches(text, f) for f in frames] == [True] * 6 + [False] * 3
    assert graph_preserving_relaxer(tokenizer, lambda s: frames)(text, decoded) is frames[5]
    assert latest_holding_frame(frames[:1] + frames[6:], lambda f: tokenizer.string_graph_matches(text, f)) is None
