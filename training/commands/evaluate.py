"""`crystal-lm evaluate`: validity, uniqueness, novelty, symmetry and property metrics of generated crystals.

GENERATED is a folder of ``*.cif`` files or a CSV with a CIF column (``--cif-column``, default ``cif``).
A CSV may carry per-structure targets: column ``spacegroup`` (declared space-group numbers, judged as
space-group consistency) and column ``crystal_system`` (a name or the label 0 cubic ... 6 triclinic, judged
as crystal-system hit rate); ``--spacegroup-column`` / ``--crystal-system-column`` rename them.
``--targets`` is a JSON file mapping target names to one value or one value per structure, e.g.
``{"crystal_system": "cubic", "bulk_modulus_gpa": 200}``; JSON targets override CSV columns. A property
target is judged by ``--predictor NAME=MODEL_DIR`` (a saved sequence-classification/regression model and
its tokenizer, see ``training.predictors``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.evaluate import (
    CRYSTAL_SYSTEM_KEY,
    MIN_DISTANCE_A,
    SPACEGROUP_KEY,
    SYMPREC_JUDGE_A,
    EvaluationReport,
    PropertyPredictor,
    chgnet_energy_per_atom,
    evaluate_structures,
    write_report,
)
from training.commands._output import print_failures
from training.io import read_structures

HELP = "Evaluate generated crystals: validity, uniqueness, novelty, symmetry, property targets, stability."

_SUMMARY_KEYS = (
    "n",
    "n_parsed",
    "n_valid_samples",
    "structural_validity",
    "compositional_validity",
    "validity",
    "uniqueness",
    "novelty",
    "unique_novel",
    "spg_consistency",
    "crystal_system_hit_rate",
    "density_wdist_g_cm3",
    "n_elements_wdist",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of `crystal-lm evaluate`."""
    parser.add_argument("generated", type=Path, help="folder of *.cif files, or a CSV with a CIF column")
    parser.add_argument("--reference", type=Path, help="reference crystals (CSV or CIF folder), e.g. the training set")
    parser.add_argument("--targets", type=Path, help="JSON file: {name: value or [one value per structure]}")
    parser.add_argument("--out", type=Path, help="write metrics.json, per_structure.json, PNGs and summary.md here")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the metrics and every unreadable row on the last line")
    parser.add_argument("--failures", type=int, default=10, help="name up to N unreadable rows on stderr")
    parser.add_argument("--cif-column", default="cif", help="CSV column holding CIF text (default: cif)")
    parser.add_argument("--spacegroup-column", default=SPACEGROUP_KEY, help="CSV column of declared space groups")
    parser.add_argument(
        "--crystal-system-column", default=CRYSTAL_SYSTEM_KEY, help="CSV column of target crystal systems"
    )
    parser.add_argument(
        "--predictor", action="append", default=[], metavar="NAME=MODEL_DIR", help="property predictor (repeatable)"
    )
    parser.add_argument("--energy", action="store_true", help="CHGNet energies and energy above the reference hull")
    parser.add_argument(
        "--formation-energy-column",
        default="formation_energy_per_atom",
        help="reference CSV column (eV/atom) used to fit elemental hull terminals the reference lacks",
    )
    parser.add_argument("--min-distance", type=float, default=MIN_DISTANCE_A, help="structural-validity cut-off in Å")
    parser.add_argument("--symprec", type=float, default=SYMPREC_JUDGE_A, help="spglib tolerance in Å for judging")


def _targets(args: argparse.Namespace, columns: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for key, column in ((SPACEGROUP_KEY, args.spacegroup_column), (CRYSTAL_SYSTEM_KEY, args.crystal_system_column)):
        if column in columns:
            targets[key] = list(columns[column])
    if args.targets is not None:
        targets.update(json.loads(args.targets.read_text()))
    return targets


def _predictors(specs: list[str]) -> dict[str, PropertyPredictor]:
    predictors: dict[str, PropertyPredictor] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--predictor {spec!r}: expected NAME=MODEL_DIR")
        from training.predictors import load_predictor

        predictors[name] = load_predictor(path)
    return predictors


def _summary(report: EvaluationReport) -> dict[str, Any]:
    data = report.to_dict()
    summary = {key: data[key] for key in _SUMMARY_KEYS}
    summary.update(energy=data["energy"], properties=data["properties"], parse_errors=data["parse_errors"])
    return summary


def run(args: argparse.Namespace) -> int:
    """Read the crystals, evaluate them, write the report and print the metrics."""
    progress = functools.partial(tqdm, file=sys.stderr, leave=False)
    try:
        generated = read_structures(args.generated, cif_column=args.cif_column, progress=progress)
        reference_set = None
        if args.reference is not None:
            reference_set = read_structures(args.reference, cif_column=args.cif_column, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"crystal-lm evaluate: {err}", file=sys.stderr)
        return 2
    reference = None if reference_set is None else reference_set.structures
    formation_energies = None if reference_set is None else reference_set.columns.get(args.formation_energy_column)
    report = evaluate_structures(
        generated.structures,
        reference=reference,
        targets=_targets(args, dict(generated.columns)),
        ids=generated.ids,
        parse_errors=generated.errors,
        predictors=_predictors(args.predictor),
        energy_model=chgnet_energy_per_atom if args.energy else None,
        reference_formation_energies=formation_energies,
        min_distance=args.min_distance,
        symprec=args.symprec,
        progress=progress,
    )
    if args.out is not None:
        write_report(report, args.out)
    summary = _summary(report)
    failures = generated.failures()
    print_failures(failures, args.failures)
    if args.json:
        print(json.dumps({**summary, "failures": failures}))
    else:
        for key, value in summary.items():
            print(f"{key:28s} {value}")
    return 0
