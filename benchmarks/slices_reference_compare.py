"""Decode SLICES strings with the published ``slices`` 2.0.12 package (TensorFlow/M3GNet) for comparison.

Run with the reference environment made by ``../shared/reference/slices/setup.sh DIR``::

    DIR/bin/python benchmarks/slices_reference_compare.py STRINGS.txt > RESULTS.jsonl

Input: one plain SLICES string per line (edges as ``i j a b c``); ``--start K`` skips the first K. Output: one JSON object per line with
``index``, ``seconds`` (wall time of ``SLICES2structure``), ``cpu_seconds`` (CPU time, xtb children
included) and ``cif`` or ``error``. Every decode runs
under a time limit (``--timeout``, s). ``benchmarks/slices_decode.py`` drives this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import signal
import sys
import time

import slices_compat  # noqa: F401  (restores names moved in newer pymatgen/ase; sets TF env vars)
from slices.core import SLICES


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the xtb runs), in s."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strings")
    parser.add_argument("--graph-method", default="econnn")
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--start", type=int, default=0, help="skip the first lines (resume an earlier run)")
    args = parser.parse_args()
    with contextlib.redirect_stdout(io.StringIO()):
        backend = SLICES(graph_method=args.graph_method)
    signal.signal(signal.SIGALRM, _alarm)
    out = sys.stdout
    with open(args.strings, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    for index, text in enumerate(lines[args.start:], start=args.start):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        record: dict = {"index": index}
        signal.alarm(args.timeout)
        try:
            with contextlib.redirect_stdout(io.StringIO()), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
                structure, _ = backend.SLICES2structure(text, strategy=3)
            record["cif"] = structure.to(fmt="cif")
        except _Timeout:
            record["error"] = f"timeout after {args.timeout} s"
        except Exception as err:  # the reference raises many types (TypeError for non-3-periodic nets)
            record["error"] = f"{type(err).__name__}: {err}"[:300]
        finally:
            signal.alarm(0)
        record["seconds"] = time.perf_counter() - start
        record["cpu_seconds"] = _cpu_seconds() - cpu_start
        print(json.dumps(record), file=out, flush=True)


if __name__ == "__main__":
    main()
