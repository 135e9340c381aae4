"""Encode + decode speed of the Wyckoff tokenizer vs one bare spglib.get_symmetry_dataset call.

Usage: python benchmarks/wyckoff_roundtrip_speed.py [CSV] [--limit N]
Structures are parsed first (CIF parsing is excluded); the run is pinned to one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spglib  # noqa: E402

from _machine import machine_line  # noqa: E402
from crystal_tokenizers import WyckoffTokenizer  # noqa: E402
from training.io import read_structures  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp20_sample" / "train.csv"
BUNDLED_CSV = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"


def best_of(repeats: int, function) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``function()`` in seconds."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", default=str(DEFAULT_CSV if DEFAULT_CSV.exists() else BUNDLED_CSV))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    structures = read_structures(args.csv, limit=args.limit).parsed()[1]
    tokenizer = WyckoffTokenizer()
    cells = [(s.lattice.matrix, s.frac_coords, s.atomic_numbers) for s in structures]
    texts = [tokenizer.structure_to_string(s) for s in structures]  # warm-up + inputs for decoding

    spglib_s = best_of(args.repeats, lambda: [spglib.get_symmetry_dataset(c, symprec=0.01) for c in cells])
    encode_s = best_of(args.repeats, lambda: [tokenizer.structure_to_string(s) for s in structures])
    decode_s = best_of(args.repeats, lambda: [tokenizer.string_to_structure(t) for t in texts])
    n = len(structures)
    print(machine_line())
    print(f"data: {args.csv} ({n} structures, CIF parsing excluded, one core, best of {args.repeats})")
    print(f"{'figure':<38}{'structures/s':>14}{'ms/structure':>14}")
    for name, seconds in (("spglib.get_symmetry_dataset (baseline)", spglib_s), ("encode", encode_s),
                          ("decode", decode_s), ("encode + decode", encode_s + decode_s)):
        print(f"{name:<38}{n / seconds:>14.1f}{1000 * seconds / n:>14.3f}")
    print(f"ratio (encode + decode) / spglib: {(encode_s + decode_s) / spglib_s:.2f}x")


if __name__ == "__main__":
    main()
