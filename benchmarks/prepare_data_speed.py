"""Benchmark: ``prepare_dataset`` throughput (structures/s) with 1 and 2 encoding processes.

Encodes MP-20 training rows (``../shared/data/mp_20/train.csv``; the bundled 600-row sample when that is
absent) with the Wyckoff tokenizer, the datasets cache off, and prints one table: structures/s with one
process (the baseline), with ``--num-proc`` processes, and their ratio, plus the machine and load.

    OMP_NUM_THREADS=1 python benchmarks/prepare_data_speed.py [--rows 1200] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line

from training.data import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "mp_20" / "train.csv"
SAMPLE = ROOT / "crystal_tokenizers" / "data" / "mp20_sample.csv"


def _rate(source: Path, num_proc: int, rows: int) -> float:
    """Structures per second of one prepare run (reading, encoding, sharding and the card included)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = prepare_dataset(source, out, representation="wyckoff", num_proc=num_proc, shard_size=500)
        seconds = time.perf_counter() - start
    assert report.total_encoded + sum(report.failures_by_type.values()) == rows
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--num-proc", type=int, default=2)
    args = parser.parse_args()
    data = SHARED if SHARED.exists() else SAMPLE
    table = pd.read_csv(data).head(args.rows)
    datasets.disable_caching()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.csv"
        table.drop(columns=[c for c in table.columns if c.startswith("Unnamed")]).to_csv(source, index=False)
        baseline = _rate(source, 1, len(table))
        parallel = _rate(source, args.num_proc, len(table))
    print(
        f"prepare-data, {len(table)} rows of {data.relative_to(ROOT.parent) if SHARED.exists() else data.name}, wyckoff"
    )
    print(f"{'setting':<28}{'structures/s':>14}")
    print(f"{'1 process (baseline)':<28}{baseline:>14.1f}")
    print(f"{f'{args.num_proc} processes':<28}{parallel:>14.1f}")
    print(f"{'ratio':<28}{parallel / baseline:>14.2f}")
    print(machine_line() + f", load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
