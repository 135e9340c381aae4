"""SLICES decoding benchmark: our decoder vs the published ``slices`` package on MP-20 crystals.

Encodes the first ``--n`` crystals of the bundled MP-20 sample, decodes every string, and prints one
table: decoded / graph-match / StructureMatcher-match rates and the median decode time per structure
(one thread; wall and CPU time, the CPU time being the per-core figure on a shared machine), for our decoder on SLICES-PLUS strings (default neighbour strategy) and on plain EconNN
SLICES strings, and for the published decoder (M3GNet on TensorFlow) on the same plain EconNN strings
of the first ``--reference-n`` crystals when ``--reference DIR`` points at the environment made by
``../shared/reference/slices/setup.sh DIR``. Ratios compare ours with the reference on those crystals.
The published decoder relaxes every crystal with M3GNet; ``--relax`` adds ours followed by the
graph-keeping CHGNet relaxation (``training.relax``, the ``mlip`` extra) on the same strings.

    OMP_NUM_THREADS=1 python benchmarks/slices_decode.py --n 200 --reference /tmp/slices_ref --reference-n 200 --relax
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    """Results of one decoder on one set of strings."""

    name: str
    n: int
    decoded: int
    graph: int
    matched: int
    seconds: list[float]
    cpu_seconds: list[float]

    def cells(self) -> list[str]:
        wall, cpu = float(np.median(self.seconds)), np.asarray(self.cpu_seconds)
        return [self.name, str(self.n), f"{self.decoded / self.n:.3f}", f"{self.graph / self.n:.3f}",
                f"{self.matched / self.n:.3f}", f"{wall:.3f}",
                f"{cpu.mean():.3f} / {np.median(cpu):.3f} / {np.percentile(cpu, 95):.3f}", f"{1 / cpu.mean():.2f}"]


def load_structures(n: int) -> list[Structure]:
    """The first ``n`` crystals of the bundled MP-20 sample."""
    with resources.as_file(resources.files("crystal_tokenizers").joinpath("data", "mp20_sample.csv")) as path:
        table = pd.read_csv(path, nrows=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in table.cif]


def run_ours(name: str, tokenizer: SlicesPlusTokenizer, structures: list[Structure],
             refine: Callable[[str, Structure], Structure] | None = None) -> tuple[Row, list[str | None]]:
    """Encode, decode (timed; ``refine``, e.g. the graph-keeping CHGNet relaxation, included) and check every
    structure with our tokenizer."""
    matcher = StructureMatcher()
    row = Row(name, len(structures), 0, 0, 0, [], [])
    texts: list[str | None] = []
    for structure in structures:
        try:
            text = tokenizer.structure_to_string(structure)
        except CrystalEncodeError:
            texts.append(None)
            continue
        texts.append(text)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            decoded = tokenizer.string_to_structure(text)
            decoded = refine(text, decoded) if refine is not None else decoded
        except CrystalDecodeError:
            decoded = None
        row.seconds.append(time.perf_counter() - start)
        row.cpu_seconds.append(time.process_time() - cpu_start)
        if decoded is None:
            continue
        row.decoded += 1
        row.graph += tokenizer.graph_matches(structure, decoded)
        row.matched += matcher.fit(structure, decoded)
    return row, texts


def run_reference(
    env: Path, texts: list[str | None], structures: list[Structure], checker: SlicesPlusTokenizer, results: Path
) -> Row:
    """Decode plain SLICES strings with the published package in its own environment.

    Its output (one JSON line per string, ``slices_reference_compare.py``) goes to ``results`` as it
    comes, and a later run with the same strings resumes after the lines already there.
    """
    row = Row("published slices 2.0.12 (M3GNet), plain EconNN SLICES", len(texts), 0, 0, 0, [], [])
    usable = [(k, t) for k, t in enumerate(texts) if t is not None]
    results.parent.mkdir(parents=True, exist_ok=True)
    done = results.read_text().splitlines() if results.exists() else []
    if len(done) < len(usable):
        with tempfile.TemporaryDirectory() as tmp, results.open("a") as sink:
            strings = Path(tmp) / "strings.txt"
            strings.write_text("\n".join(t for _, t in usable) + "\n")
            env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
                        "TF_NUM_INTEROP_THREADS": "1"}
            subprocess.run([str(env / "bin" / "python"), str(HERE / "slices_reference_compare.py"), str(strings),
                            "--start", str(len(done))], stdout=sink, stderr=subprocess.DEVNULL, env=env_vars, check=False)
    matcher = StructureMatcher()
    for line in results.read_text().splitlines()[: len(usable)]:
        record = json.loads(line)
        k = usable[record["index"]][0]
        row.seconds.append(record["seconds"])
        row.cpu_seconds.append(record["cpu_seconds"])
        if "cif" not in record:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                decoded = Structure.from_str(record["cif"], fmt="cif")
            except ValueError:  # a CIF of NaN coordinates
                continue
        if not (np.all(np.isfinite(decoded.lattice.matrix)) and np.all(np.isfinite(decoded.frac_coords))):  # NaN cell
            continue
        row.decoded += 1
        row.graph += checker.string_graph_matches(texts[k], decoded)
        row.matched += matcher.fit(structures[k], decoded)
    row.n = usable[len(row.seconds) - 1][0] + 1 if row.seconds else 0  # crystals covered so far
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--reference", type=Path, default=None, help="environment of the published package")
    parser.add_argument("--reference-n", type=int, default=30, help="crystals decoded by the reference (slow)")
    parser.add_argument("--reference-results", type=Path, default=HERE.parent / "outputs" / "slices_reference.jsonl",
                        help="JSON lines of the reference decodes, written as they come; a rerun resumes there")
    parser.add_argument("--relax", action="store_true",
                        help="also ours + CHGNet relaxation kept only while the graph holds (the mlip extra), on the "
                             "reference's strings: the published decoder relaxes with M3GNet")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    structures = load_structures(args.n)
    plus = SlicesPlusTokenizer()
    plain = SlicesPlusTokenizer(strategy="econnn", symmetry=False)
    rows = [run_ours(f"ours, SLICES-PLUS ({plus.strategy})", plus, structures)[0]]
    plain_row, plain_texts = run_ours("ours, plain EconNN SLICES", plain, structures)
    rows.append(plain_row)
    reference_note = "reference not run (no --reference)"
    if args.reference is not None:
        if (args.reference / "bin" / "python").exists():
            ref = run_reference(args.reference, plain_texts[: args.reference_n], structures[: args.reference_n], plain,
                                args.reference_results)
            k = ref.n  # fewer than --reference-n while an interrupted run has not been resumed
            ours = run_ours(f"ours, plain EconNN SLICES, first {k}", plain, structures[:k])[0]
            rows += [ours, ref]
            speed = np.median(ref.cpu_seconds) / np.median(ours.cpu_seconds)
            reference_note = (f"on the same {k} strings: ours is {speed:.0f}x faster (median CPU time), graph match "
                              f"{ours.graph / k:.3f} vs {ref.graph / k:.3f}, StructureMatcher {ours.matched / k:.3f} "
                              f"vs {ref.matched / k:.3f}")
            if args.relax:
                from training.relax import graph_preserving_relaxer

                relaxed = run_ours(f"ours, plain EconNN SLICES + CHGNet (graph kept), first {k}", plain, structures[:k],
                                   graph_preserving_relaxer(plain))[0]
                rows.append(relaxed)
                reference_note += (f"; relaxed: graph match {relaxed.graph / k:.3f}, StructureMatcher "
                                   f"{relaxed.matched / k:.3f} (median CPU {np.median(relaxed.cpu_seconds):.2f} s)")
        else:
            reference_note = f"reference not run: {args.reference}/bin/python does not exist"
    header = ["decoder, strings", "n", "decoded", "graph match", "StructureMatcher", "median wall s",
              "CPU s mean / median / p95", "structures/s per core (CPU, mean)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print(f"\n{reference_note}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
