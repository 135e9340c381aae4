"""SLICES / SLICES-PLUS text <-> graph + operations: grammar, letter tables, published strings."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_tokenizers.errors import MalformedSequenceError
from crystal_tokenizers.slices import codec
from crystal_tokenizers.slices.graph import CrystalGraph
from tests.conftest import SHARED_DATA, requires_shared

IDENTITY = "i u y 1s 1s 1s"


def test_identity_group_parses_to_identity_matrix():
    record = codec.parse_record(f"Na Cl 0 1 o o o 0 1 + o o {IDENTITY}")
    rotation, translation = record.symops[0].matrices()
    assert np.array_equal(rotation, np.eye(3, dtype=int))
    assert np.array_equal(translation, np.zeros(3))


def test_letter_tables_cover_every_row_and_fraction():
    rows = {r for r in codec.ROTATION_ROWS.values()}
    assert len(rows) == 26 and (0, 0, 0) not in rows
    assert codec.TRANSLATION_CODES["13s"] == Fraction(3, 8)
    assert codec.nearest_code(0.49) == "2s" and codec.nearest_code(0.999) == "9s" and codec.nearest_code(-1e-9) == "1s"


def test_joined_and_separate_edge_forms_give_one_graph():
    joined = codec.parse_record("Sr Cd P 0 2 -o- 1 2 ooo 0 1 o+o")
    separate = codec.parse_record("Sr Cd P 0 2 - o - 1 2 o o o 0 1 o + o")
    assert joined == separate
    assert codec.format_record(joined) == "Sr Cd P 0 1 o + o 0 2 - o - 1 2 o o o"


def test_reversed_edge_is_the_same_bond():
    forward = codec.parse_record("Na Cl 0 1 + o o").graph
    backward = codec.parse_record("Na Cl 1 0 - o o").graph
    assert forward == backward


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0 1 o o o",  # no species
        "Na Cl",  # no edges
        "Na Cl 0 2 o o o",  # node out of range
        "Na Cl 0 1 o o",  # incomplete edge
        "Na Cl 0 1 o x o",  # bad label
        "Na Na 0 0 o o o",  # self-bond in the same cell
        "Na Cl 0 1 o o o i u y 1s 1s",  # short symmetry group
        "Na Cl 0 1 o o o i u y 1s 1s 14s",  # unknown translation code
        "Na Cl 0 1 o o o o u y 1s 1s 1s",  # 'o' is a label, the row letter is 'o1'
    ],
)
def test_malformed_strings_raise_typed_error(text):
    with pytest.raises(MalformedSequenceError):
        codec.parse_record(text)


FUZZ_TOKENS = ["Na", "O", "0", "1", "2", "o", "+", "-", "ooo", "i", "u", "y", "1s", "o1", "x", "Xx"]


@given(st.lists(st.sampled_from(FUZZ_TOKENS), max_size=60).map(" ".join))
@settings(max_examples=200, deadline=None)
def test_parser_never_crashes(text):
    try:
        record = codec.parse_record(text)
    except MalformedSequenceError:
        return
    assert codec.parse_record(codec.format_record(record)) == record


@pytest.mark.parametrize(
    "relative, column",
    [
        pytest.param(relative, column, marks=requires_shared(relative))
        for relative, column in [
            ("slices_plus_paper/crystal_system.csv", "slices"),
            ("slices_plus_paper/formation_energy.csv", "slices_plus"),
            ("slices_plus_paper/crystal_system_plus_4class.csv", "slices_plus"),
            ("slices_plus_paper/crystal_system_plus_7class.csv", "slices_plus"),
            ("slices_plus_paper/elastic_cubic.csv", "slices"),
            ("slices_mp20_nonmetal/slices_eform_bandgap.csv", "slices"),
        ]
    ],
)
def test_every_published_string_parses(relative, column):
    texts = pd.read_csv(SHARED_DATA / relative)[column]
    records = [codec.parse_record(text) for text in texts]
    assert len(records) == len(texts)
    if column == "slices_plus":
        assert all(any(op.tokens() == tuple(IDENTITY.split()) for op in r.symops) for r in records)


def test_format_is_canonical_and_reparses():
    graph = CrystalGraph(("Na", "Cl"), ((0, 1, 1, 0, 0), (0, 1, 0, 0, 0), (0, 0, 0, 1, 0))).canonical()
    text = codec.format_record(codec.SlicesRecord(graph, ()))
    assert text == "Na Cl 0 0 o + o 0 1 o o o 0 1 + o o"
    assert codec.parse_record(text).graph == graph


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Na Cl 0 5 o o o", "names node 5, but the string has 2 nodes (0-1)"),
        ("Na Cl 0 1 o o o 0 1", "incomplete: '0 1' (the string ends after 0 of its 3 image labels)"),
        ("Na Cl 0 1 o o o 0 1 o x o 0 1 + o o", "invalid image labels ['o', 'x', 'o'] ('x' is a rotation letter)"),
        ("Na Cl 0 0 o o o 0 1 o o o", "bonds node 0 to itself in the same cell"),
        ("Na Cl 0 1 o o o i u y 1s 1s 1s Na", "7 tokens, not a multiple of 6; token 13 'Na' is an element symbol"),
        ("Na Cl 0 1 o o o i u 1s 1s 1s 1s", "('1s' is a translation code; a group is 3 rotation letters"),
    ],
)
def test_malformed_strings_say_exactly_why(text, reason):
    with pytest.raises(MalformedSequenceError) as err:
        codec.parse_record(text)
    assert reason in str(err.value)


def test_lenient_parse_repairs_and_lists_what_it_changed():
    text = "Na Cl K 0 1 o o o 0 1 + o o 0 1 o + o 0 1 o o + 0 7 o o o 1 1 + o o 0 1 i u y 1s 1s 1s i u"
    with pytest.raises(MalformedSequenceError):
        codec.parse_record(text)
    record = codec.parse_record(text, lenient=True)
    assert record.graph.species == ("Na", "Cl")  # unbonded K removed
    assert len(record.graph.edges) == 5 and len(record.symops) == 1
    assert len(record.repairs) == 4
    assert [r.split(":")[0] for r in record.repairs] == ["dropped", "dropped", "dropped", "removed"]
    assert codec.parse_record(format_like := codec.format_record(record), lenient=True).repairs == ()
    assert codec.parse_record(format_like).graph == record.graph


def test_lenient_parse_of_a_well_formed_string_changes_nothing():
    text = "Na Cl 0 1 o o o 0 1 + o o 0 1 o + o 0 1 o o + i u y 1s 1s 1s"
    assert codec.parse_record(text, lenient=True) == codec.parse_record(text)
