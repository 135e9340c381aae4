"""`crystal-lm roundtrip`: encode and decode every structure of a file and compare with StructureMatcher.

Crystals are compared by element: oxidation states are not encoded by any tokenizer, so they are removed
when the CIFs are read (``training.io.parse_cif``). Every failed row is named: parse, encode, decode or
match, with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from crystal_tokenizers import GraphCrystalTokenizer
from crystal_tokenizers.loading import TOKENIZER_NAMES, load_tokenizer
from crystal_tokenizers.roundtrip import round_trip
from training.commands._output import print_failures
from training.io import read_structures
from training.relax import graph_preserving_relaxer

HELP = "Round-trip structures through a tokenizer (structure -> string -> structure) and report match rates."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSV file with a CIF column, or a folder of .cif files")
    parser.add_argument("--tokenizer", default="wyckoff",
                        help=f"one of {sorted(TOKENIZER_NAMES)} or a saved tokenizer folder")
    parser.add_argument("--cif-column", default="cif")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--symprec", type=float, default=None, help="spglib tolerance in Å (Wyckoff tokenizer)")
    parser.add_argument("--failures", type=int, default=10, help="name up to N failed rows on stderr")
    parser.add_argument("--relax", action="store_true",
                        help="relax every SLICES decode with CHGNet (the mlip extra), kept if its graph still matches")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (counts and every failed row) on the last line")


def run(args: argparse.Namespace) -> int:
    kwargs = {"symprec": args.symprec} if args.symprec is not None else {}
    tokenizer = load_tokenizer(args.tokenizer, **kwargs)
    loaded = read_structures(args.file, cif_column=args.cif_column, limit=args.limit)
    ids, structures = loaded.parsed()
    parse_failures = [{"stage": "parse", **failure} for failure in loaded.failures()]

    def progress(items):
        return tqdm(items, total=len(items), file=sys.stderr, desc="round trip", leave=False)

    refine = None
    if args.relax:
        if not isinstance(tokenizer, GraphCrystalTokenizer):
            print("--relax applies to the SLICES tokenizers only", file=sys.stderr)
            return 2
        refine = graph_preserving_relaxer(tokenizer)
    report = round_trip(tokenizer, structures, ids=ids, progress=progress, refine=refine)
    result = report.to_dict()
    if parse_failures:
        result["n"] += len(parse_failures)
        for failure in parse_failures:
            result["errors"][failure["error"]] = result["errors"].get(failure["error"], 0) + 1
        result["match_rate"] = result["matched"] / result["n"]
        if "graph_matched" in result:
            result["graph_match_rate"] = result["graph_matched"] / result["n"]
    failures = parse_failures + [_with_reason(failure) for failure in report.failures]
    print_failures(failures, args.failures)
    if args.json:
        print(json.dumps({**result, "failures": failures}))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


def _with_reason(failure: dict) -> dict:
    """A failed match says why (its message is the encoded text)."""
    if failure["stage"] != "match":
        return failure
    return {**failure, "message": f"decoded crystal does not match the input (StructureMatcher); text: {failure['message']}"}
