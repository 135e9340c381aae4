"""Agreement of our SLICES-PLUS encoder with the published strings and the published encoding rule.

1. Symmetry part, all crystals of ``mp20_sample/{train,val}.csv``: our 6-token groups vs the published
   rule applied literally (``SpacegroupAnalyzer(structure).get_symmetry_operations()``, pymatgen
   defaults, letter tables), compared as sets.
2. Published strings matched to MP-20 crystals by formation energy (to 1e-8 eV/atom): the symmetry
   groups of ``slices_plus_paper/formation_energy.csv`` (sets) and the crystal graphs of
   ``slices_mp20_nonmetal`` (equal up to node relabelling, per neighbour strategy).

    OMP_NUM_THREADS=1 python benchmarks/slices_symmetry_agreement.py
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystal_tokenizers.errors import CrystalEncodeError
from crystal_tokenizers.slices import codec
from crystal_tokenizers.slices.graph import NEIGHBOUR_STRATEGIES, graphs_match, structure_to_graph

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def published_groups(structure: Structure) -> set[tuple[str, ...]]:
    """The published rule, literally: pymatgen defaults, every operation written with the tables."""
    return {codec.symop_from_matrices(op.rotation_matrix, op.translation_vector).tokens()
            for op in SpacegroupAnalyzer(structure).get_symmetry_operations()}


def read(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / name)


def structures_by_energy(table: pd.DataFrame) -> dict[float, Structure]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {round(e, 8): Structure.from_str(c, fmt="cif") for e, c in zip(table.formation_energy_per_atom, table.cif)}


def main() -> None:
    logging.disable(logging.WARNING)
    sample = pd.concat([read("mp20_sample/train.csv"), read("mp20_sample/val.csv")])
    agree = failed = 0
    for cif in sample.cif:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(cif, fmt="cif")
        try:
            ours = {op.tokens() for op in codec.symmetry_operations(structure)}
        except CrystalEncodeError:
            failed += 1
            continue
        agree += ours == published_groups(structure)
    print("| check | n | agree |")
    print("|---|---|---|")
    print(f"| symmetry groups vs published rule, mp20_sample train+val | {len(sample)} | {agree} ({failed} not encodable) |")

    mp20 = structures_by_energy(read("mp_20/train.csv"))
    plus = read("slices_plus_paper/formation_energy.csv")
    matched = [(t, mp20[round(e, 8)]) for t, e in zip(plus.slices_plus, plus.formation_energy_per_atom) if round(e, 8) in mp20]
    same = sum({op.tokens() for op in codec.parse_record(t).symops} == {op.tokens() for op in codec.symmetry_operations(s)}
               for t, s in matched)
    print(f"| symmetry groups vs published SLICES-PLUS strings (formation_energy.csv ∩ mp_20) | {len(matched)} | {same} |")

    nonmetal = read("slices_mp20_nonmetal/slices_eform_bandgap.csv")
    matched = [(t, mp20[round(e, 8)]) for t, e in zip(nonmetal.slices, nonmetal.formation_energy_per_atom) if round(e, 8) in mp20]
    for strategy in NEIGHBOUR_STRATEGIES:
        same = sum(graphs_match(codec.parse_record(t).graph, structure_to_graph(s, strategy)) for t, s in matched)
        print(f"| crystal graph vs published SLICES 2.x strings ({strategy}) | {len(matched)} | {same} |")


if __name__ == "__main__":
    main()
