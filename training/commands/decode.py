"""`crystal-lm decode`: decode a CSV column of token strings to crystals, write CIFs, report validity."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from crystal_tokenizers.loading import TOKENIZER_NAMES, load_tokenizer
from training.commands._output import print_failures
from training.decoding import decode_texts

HELP = "Decode a column of token strings to crystals, write CIFs and report validity per crystal system."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSV file with a column of token strings")
    parser.add_argument("--tokenizer", default="slices-plus",
                        help=f"one of {sorted(TOKENIZER_NAMES)} or a saved tokenizer folder")
    parser.add_argument("--column", default="slices_plus", help="column holding the strings")
    parser.add_argument("--label-column", default="crystal_system",
                        help="column of crystal-system labels (0 cubic … 6 triclinic), used when present")
    parser.add_argument("--id-column", default="material_id", help="column naming the rows (default: row index)")
    parser.add_argument("--strategy", default=None,
                        help="neighbour strategy for the graph check (default: the tokenizer's own)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--out", default=None, help="write one CIF per decoded crystal into this folder")
    parser.add_argument("--failures", type=int, default=10, help="name up to N failed rows on stderr")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (counts and every failed row) on the last line")


def run(args: argparse.Namespace) -> int:
    kwargs = {"strategy": args.strategy} if args.strategy else {}
    tokenizer = load_tokenizer(args.tokenizer, **kwargs)
    table = pd.read_csv(args.file, nrows=args.limit, keep_default_na=False, na_values=[""])
    if args.column not in table.columns:
        print(f"error: {args.file} has no column {args.column!r} (columns: {list(table.columns)})", file=sys.stderr)
        return 2
    texts = table[args.column].tolist()
    labels = table[args.label_column].tolist() if args.label_column in table.columns else None
    ids = table[args.id_column].astype(str).tolist() if args.id_column in table.columns else None

    def progress(items):
        return tqdm(items, total=len(items), file=sys.stderr, desc="decode", leave=False)

    report, structures = decode_texts(tokenizer, texts, labels, ids=ids, progress=progress)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for index, structure in enumerate(structures):
            if structure is not None:
                structure.to(filename=str(out / f"{index:06d}.cif"))
    print_failures(report.failures, args.failures)
    if args.json:
        print(json.dumps(report.to_dict(with_failures=True)))
    else:
        for key, value in report.to_dict().items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0

