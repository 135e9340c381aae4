"""The pre-training union: every shared structure set, de-duplicated, with the validation crystals held out.

Sources (train rows): mp_20/train, mp20_sample/train, perov_5/val, carbon_24/val, elastic_tensor_2015/train.
Held out: mp_20/val and mp20_sample/val (the inpainting evaluation crystals), by id and by a
StructureMatcher fit (pymatgen defaults) against every held-out crystal of the same reduced formula,
space group (spglib, symprec 0.1 Å) and number of sites (the key keeps carbon_24's 2,000 all-carbon
crystals from a quadratic number of fits).
Duplicates inside the union are removed the same way (first source wins). The CSV has a ``split`` column
(train = the union, validation = mp_20/val), so ``crystal-lm prepare-data`` keeps it as given. A share of
the mp_20/train rows of the union (``--calibration-fraction``, chosen by a SHA-256 hash of the id) becomes
the ``calibration`` split: training data kept out of pre-training, on which the chemistry-aware ranking's
weights are chosen (``benchmarks/inpainting_calibrate.py``), so that no weight is tuned on validation:

    python benchmarks/inpainting_union.py --out runs/union/union.csv
    crystal-lm prepare-data runs/union/union.csv --out runs/union/data/union --shard-size 2000
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TRAIN_SOURCES = ("mp_20/train.csv", "mp20_sample/train.csv", "perov_5/val.csv", "carbon_24/val.csv",
                 "elastic_tensor_2015/train.csv")
HELD_OUT = ("mp_20/val.csv", "mp20_sample/val.csv")
PROPERTIES = ("formation_energy_per_atom", "e_above_hull", "band_gap")
CALIBRATION_SOURCE = "mp_20/train.csv"
DEFAULT_CALIBRATION_FRACTION = 0.12
"""Share of the union's mp_20/train rows kept out of pre-training for choosing the ranking weights."""


def _rows(name: str) -> pd.DataFrame:
    table = pd.read_csv(SHARED / name)
    prefix = "" if str(table["material_id"].iloc[0]).startswith(("mp-", "mvc-")) else name.split("/")[0] + "-"
    out = pd.DataFrame({"material_id": [prefix + str(m) for m in table["material_id"]], "cif": table["cif"],
                        "source": name})
    for column in PROPERTIES:
        out[column] = table[column] if column in table.columns else float("nan")
    return out


def _structures(cifs: pd.Series) -> list:
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(c, fmt="cif") for c in cifs]


def _key(structure) -> tuple[str, int, int]:
    """Reduced formula, space group (spglib at 0.1 Å; 0 if it fails) and number of sites."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    try:
        group = SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()
    except Exception:  # noqa: BLE001 - spglib failure: group 0 (compared with the other failures only)
        group = 0
    return structure.composition.reduced_formula, group, len(structure)


def build_union() -> tuple[pd.DataFrame, dict[str, int]]:
    """The union's train rows plus mp_20/val as validation, and counts of what was dropped and why."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    held = pd.concat([_rows(name) for name in HELD_OUT]).drop_duplicates("material_id")
    held_ids = set(held["material_id"])
    kept_by_formula: dict[str, list] = defaultdict(list)
    for structure in _structures(held["cif"]):
        kept_by_formula[_key(structure)].append(("held", structure))
    counts = {"rows": 0, "duplicate_id": 0, "held_out_id": 0, "held_out_match": 0, "duplicate_match": 0}
    keep, seen = [], set()
    for name in TRAIN_SOURCES:
        table = _rows(name)
        counts["rows"] += len(table)
        for row, structure in zip(table.itertuples(index=False), _structures(table["cif"])):
            if row.material_id in held_ids:
                counts["held_out_id"] += 1
                continue
            if row.material_id in seen:
                counts["duplicate_id"] += 1
                continue
            group = kept_by_formula[_key(structure)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hit = next((kind for kind, other in group if matcher.fit(structure, other)), None)
            if hit is not None:
                counts["held_out_match" if hit == "held" else "duplicate_match"] += 1
                continue
            seen.add(row.material_id)
            group.append(("train", structure))
            keep.append(row._asdict())
    train = pd.DataFrame(keep).assign(split="train")
    validation = _rows("mp_20/val.csv").assign(split="validation")
    counts["train"] = len(train)
    counts["validation"] = len(validation)
    counts["by_source"] = train["source"].value_counts().to_dict()
    return pd.concat([train, validation], ignore_index=True), counts


def with_calibration_split(table: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """``table`` with the mp_20/train rows of its train split whose id hashes below ``fraction`` moved to ``calibration``."""
    from training.data import hash_fraction

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction must lie in [0, 1), got {fraction}")
    chosen = (table["split"] == "train") & (table["source"] == CALIBRATION_SOURCE) & \
        table["material_id"].map(lambda m: hash_fraction(str(m)) < fraction)
    return table.assign(split=table["split"].where(~chosen, "calibration"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/union/union.csv"))
    parser.add_argument("--calibration-fraction", type=float, default=DEFAULT_CALIBRATION_FRACTION,
                        help="share of the union's mp_20/train rows moved to the calibration split")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table, counts = build_union()
    table = with_calibration_split(table, args.calibration_fraction)
    counts["calibration"] = int((table["split"] == "calibration").sum())
    counts["train"] -= counts["calibration"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"{counts} -> {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
