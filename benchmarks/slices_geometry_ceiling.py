"""How much of a crystal's geometry a SLICES-PLUS string fixes: the decoder with its fitted bond lengths
against the same decoder given every bond's true length (an oracle no decoder has).

Each crystal of ``FILE`` is encoded (default neighbour strategy, canonical node order) and decoded twice:
with the fitted bond-length model of ``slices.radii`` (what ``SlicesPlusTokenizer`` does), and with the
target of every bond replaced by its length in the original crystal. The table gives both graph-match
and StructureMatcher (pymatgen defaults) rates. Where the oracle misses, the string plus exact bond
lengths still leave the geometry open (tilts, layer spacings, cell angles): the decoder's non-bonded
terms, not its bond lengths, decide those. ``--relax`` adds a third row: the fitted decode relaxed with
CHGNet (the ``mlip`` extra; cell and positions, fmax 0.05 eV/Å, at most 500 FIRE steps), kept whatever
its graph, as an upper bound of what an ML potential adds.

    OMP_NUM_THREADS=1 python benchmarks/slices_geometry_ceiling.py ../shared/data/mp20_sample/val.csv [--relax]
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from unittest import mock

import numpy as np
import pandas as pd
from _machine import machine_line
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError
from crystal_tokenizers.roundtrip import default_matcher
from crystal_tokenizers.slices import embedding, graph
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer

RELAXED = "fitted, then CHGNet relaxation"


def true_bond_lengths(structure: Structure, tokenizer: SlicesPlusTokenizer) -> np.ndarray:
    """Length (Å) of every edge of the tokenizer's canonical graph of ``structure``, in edge order."""
    raw = graph.structure_to_graph(structure, tokenizer.strategy)
    order = graph.canonical_order(raw, structure.frac_coords)
    edges = np.array(raw.permuted(order).edges, dtype=int).reshape(-1, 5)
    frac = structure.frac_coords[order]
    vectors = (frac[edges[:, 1]] - frac[edges[:, 0]] + edges[:, 2:]) @ structure.lattice.matrix
    return np.linalg.norm(vectors, axis=1)


def decode_both(
    structure: Structure, tokenizer: SlicesPlusTokenizer, matcher, relax=None
) -> dict[str, tuple[bool, bool] | None]:
    """(graph match, StructureMatcher match) of the fitted and the oracle decode (and of the relaxed fitted
    decode, with ``relax``); None where it failed."""
    text = tokenizer.structure_to_string(structure)
    lengths = true_bond_lengths(structure, tokenizer)
    outcome: dict[str, tuple[bool, bool] | None] = {}
    for name, targets in (("fitted bond-length model", None), ("true bond lengths (oracle)", lengths)):
        oracle = mock.patch.object(embedding, "bond_targets", lambda _graph, t=targets: t.copy())
        try:
            with oracle if targets is not None else contextlib.nullcontext():
                decoded = tokenizer.string_to_structure(text)
        except CrystalDecodeError:
            outcome[name] = None
            continue
        outcome[name] = (tokenizer.graph_matches(structure, decoded), bool(matcher.fit(structure, decoded)))
        if relax is not None and targets is None:
            try:
                relaxed = relax(decoded)
            except (ValueError, RuntimeError):
                outcome[RELAXED] = None
                continue
            outcome[RELAXED] = (tokenizer.graph_matches(structure, relaxed), bool(matcher.fit(structure, relaxed)))
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="CSV with a cif column (e.g. ../shared/data/mp20_sample/val.csv)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--relax", action="store_true", help="also relax the fitted decode with CHGNet (mlip extra)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tokenizer, matcher = SlicesPlusTokenizer(), default_matcher()
    relax = None
    if args.relax:
        from training.relax import chgnet_relaxer

        relax = chgnet_relaxer(fmax=0.05, steps=500)
    table = pd.read_csv(args.file).head(args.limit)
    counts: dict[str, list[int]] = {}
    skipped = 0
    for cif in table.cif:
        try:
            outcome = decode_both(Structure.from_str(cif, fmt="cif"), tokenizer, matcher, relax)
        except CrystalEncodeError:
            skipped += 1
            continue
        for name, result in outcome.items():
            row = counts.setdefault(name, [0, 0, 0])
            if result is not None:
                row[0] += 1
                row[1] += result[0]
                row[2] += result[1]
    n = len(table)
    print(machine_line())
    print(f"{args.file}: {n} crystals ({skipped} not encodable, counted as misses)")
    print(f"{'decode':<34}{'decoded':>9}{'graph':>9}{'StructureMatcher':>18}")
    for name, (decoded, graph_ok, matched) in counts.items():
        print(f"{name:<34}{decoded / n:>9.3f}{graph_ok / n:>9.3f}{matched / n:>18.3f}")
    fitted, oracle = counts["fitted bond-length model"][2], counts["true bond lengths (oracle)"][2]
    print(f"StructureMatcher matches, oracle / fitted: {oracle} / {fitted} = {oracle / max(fitted, 1):.3f}")


if __name__ == "__main__":
    main()
