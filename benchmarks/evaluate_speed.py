"""Benchmark: `evaluate` on 1,000 MP-20 structures against a reference of the other MP-20 training rows.

Prints one table: the end-to-end time (CIF parsing included) of ``read_structures`` + ``evaluate_structures``
with the composition-keyed prefilter, the baseline of naive all-pairs ``StructureMatcher.fit`` for
uniqueness and novelty (timed on a subset and extrapolated to all pairs), the bare CIF-parse time, and
their ratios, plus the machine. Target: under 120 s on 2 cores.

    OMP_NUM_THREADS=1 python benchmarks/evaluate_speed.py [--n 1000] [--baseline-rows 10] [--energy]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from pymatgen.analysis.structure_matcher import StructureMatcher

from training.evaluate import chgnet_energy_per_atom, evaluate_structures
from training.io import read_structures

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp_20" / "train.csv"
TARGET_S = 120.0


def _naive_pairs_seconds(generated: list, reference: list, rows: int) -> tuple[float, int]:
    """Seconds per ``fit`` call without a prefilter, timed on ``rows`` generated rows against everything."""
    matcher = StructureMatcher()
    others = generated + reference
    start = time.perf_counter()
    for structure in generated[:rows]:
        for other in others:
            matcher.fit(structure, other)
    return (time.perf_counter() - start) / (rows * len(others)), rows * len(others)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of generated structures")
    parser.add_argument("--baseline-rows", type=int, default=10, help="rows timed for the naive all-pairs baseline")
    parser.add_argument("--energy", action="store_true", help="also time CHGNet energies and the reference hull")
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: this benchmark needs the shared MP-20 rows")
    torch.set_num_threads(1)
    table = pd.read_csv(DATA)
    with tempfile.TemporaryDirectory() as tmp:
        generated_csv, reference_csv = Path(tmp) / "generated.csv", Path(tmp) / "reference.csv"
        table.iloc[: args.n].to_csv(generated_csv, index=False)
        table.iloc[args.n :].to_csv(reference_csv, index=False)

        start = time.perf_counter()
        generated = read_structures(generated_csv)
        reference = read_structures(reference_csv)
        parse_s = time.perf_counter() - start
        report = evaluate_structures(
            generated.structures,
            reference=reference.structures,
            targets={"spacegroup": list(generated.columns["spacegroup.number"])},
            ids=generated.ids,
            parse_errors=generated.errors,
            energy_model=chgnet_energy_per_atom if args.energy else None,
            reference_formation_energies=reference.columns["formation_energy_per_atom"],
        )
        total_s = time.perf_counter() - start

    valid = [s for s, r in zip(generated.structures, report.records, strict=True) if r.structurally_valid]
    reference_structures = [s for s in reference.structures if s is not None]
    per_fit_s, fits_timed = _naive_pairs_seconds(valid, reference_structures, args.baseline_rows)
    n_valid = report.n_valid_samples
    naive_pairs = n_valid * (n_valid - 1) // 2 + n_valid * len(reference_structures)
    naive_s = per_fit_s * naive_pairs
    matching_s = report.timings_s["uniqueness"] + report.timings_s["novelty"]

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {_cpu_name()}, {cores} cores available, "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"data: {report.n} generated (MP-20 train rows 0-{args.n - 1}), {len(reference_structures)} reference rows")
    summary = report.to_dict()
    keys = ("structural_validity", "compositional_validity", "uniqueness", "novelty", "spg_consistency")
    print("metrics: " + ", ".join(f"{k} {summary[k]:.4f}" for k in keys))
    if report.energy:
        print(f"energy: {report.energy}")
    print()
    print("| figure | seconds | baseline | baseline seconds | ratio (baseline / figure) |")
    print("|---|---|---|---|---|")
    print(f"| evaluate end to end ({report.n} + {len(reference_structures)} CIFs parsed) | {total_s:.1f} | "
          f"bare CIF parse of the same files | {parse_s:.1f} | {parse_s / total_s:.2f} |")
    print(f"| uniqueness + novelty with composition prefilter | {matching_s:.2f} | naive all-pairs StructureMatcher "
          f"({naive_pairs:,} fits, {per_fit_s * 1e3:.3f} ms/fit from {fits_timed:,} timed) | {naive_s:.0f} | "
          f"{naive_s / matching_s:.0f} |")
    print()
    print("stage timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings_s.items()))
    if args.energy:
        print(f"{total_s:.1f} s with CHGNet energies (the {TARGET_S:.0f} s target applies to runs without --energy)")
    else:
        verdict = "PASS" if total_s < TARGET_S else "FAIL"
        print(f"{verdict}: {total_s:.1f} s for {report.n} structures (target < {TARGET_S:.0f} s)")


if __name__ == "__main__":
    main()
