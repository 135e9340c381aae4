"""`crystal-lm decode`: decode a CSV column of token strings to crystals, write CIFs, report validity."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
from tqdm import tqdm

from crystal_tokenizers import CRYSTAL_SYSTEMS, CrystalDecodeError
from crystal_tokenizers.loading import TOKENIZER_NAMES, load_tokenizer

HELP = "Decode a column of token strings to crystals, write CIFs and report validity per crystal system."

JUDGE_SYMPREC = 0.1
"""spglib tolerance (Å) for judging the crystal system of a decoded crystal."""


@dataclass
class DecodeReport:
    """Counts of one decode run; ``valid`` = decoded and the crystal graph matches the string."""

    n: int
    decoded: int
    valid: int
    decode_per_s: float
    errors: dict[str, int]
    by_crystal_system: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with rates (0–1) and without the per-item failures."""
        data = asdict(self)
        data.pop("failures")
        data["decoded_rate"] = self.decoded / self.n if self.n else 0.0
        data["valid_rate"] = self.valid / self.n if self.n else 0.0
        labelled = sum(v["n"] for v in self.by_crystal_system.values())
        if labelled:
            data["crystal_system_rate"] = sum(v["correct"] for v in self.by_crystal_system.values()) / labelled
        return data


def decoded_crystal_system(structure: Structure, symprec: float = JUDGE_SYMPREC) -> str | None:
    """Crystal system of ``structure`` found by spglib at ``symprec`` (Å), or None if spglib fails."""
    try:
        return SpacegroupAnalyzer(structure, symprec=symprec).get_crystal_system()
    except (TypeError, ValueError):
        return None


def label_name(label: Any) -> str:
    """Crystal-system name of a label: 0–6 in the package numbering, or the name itself."""
    try:
        return CRYSTAL_SYSTEMS[int(label)]
    except (TypeError, ValueError):
        return str(label)


def decode_texts(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[Any] | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
) -> tuple[DecodeReport, list[Structure | None]]:
    """Decode every text; count decoded, valid (graph matches) and crystal systems against ``labels``."""
    errors: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    structures: list[Structure | None] = []
    seconds = 0.0
    valid = 0
    by_system: dict[str, dict[str, int]] = {}
    for index, text in enumerate(progress(texts)):
        start = time.perf_counter()
        try:
            structure = tokenizer.string_to_structure(text)
        except CrystalDecodeError as err:
            structure = None
            errors[type(err).__name__] += 1
            failures.append({"index": index, "error": type(err).__name__, "message": str(err)})
        seconds += time.perf_counter() - start
        structures.append(structure)
        if structure is not None and tokenizer.string_graph_matches(text, structure):
            valid += 1
        if labels is not None:
            counts = by_system.setdefault(label_name(labels[index]), {"n": 0, "decoded": 0, "correct": 0})
            counts["n"] += 1
            if structure is not None:
                counts["decoded"] += 1
                counts["correct"] += decoded_crystal_system(structure) == label_name(labels[index])
    decoded = sum(s is not None for s in structures)
    report = DecodeReport(
        n=len(texts), decoded=decoded, valid=valid, errors=dict(errors), by_crystal_system=by_system,
        decode_per_s=len(texts) / seconds if seconds > 0 else float("inf"), failures=failures,
    )
    return report, structures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSV file with a column of token strings")
    parser.add_argument("--tokenizer", default="slices-plus",
                        help=f"one of {sorted(TOKENIZER_NAMES)} or a saved tokenizer folder")
    parser.add_argument("--column", default="slices_plus", help="column holding the strings")
    parser.add_argument("--label-column", default="crystal_system",
                        help="column of crystal-system labels (0 cubic … 6 triclinic), used when present")
    parser.add_argument("--strategy", default=None,
                        help="neighbour strategy for the graph check (default: the tokenizer's own)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--out", default=None, help="write one CIF per decoded crystal into this folder")
    parser.add_argument("--failures", type=int, default=10, help="list up to N failures on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def run(args: argparse.Namespace) -> int:
    kwargs = {"strategy": args.strategy} if args.strategy else {}
    tokenizer = load_tokenizer(args.tokenizer, **kwargs)
    table = pd.read_csv(args.file, nrows=args.limit)
    if args.column not in table.columns:
        print(f"error: {args.file} has no column {args.column!r} (columns: {list(table.columns)})", file=sys.stderr)
        return 2
    texts = table[args.column].astype(str).tolist()
    labels = table[args.label_column].tolist() if args.label_column in table.columns else None

    def progress(items):
        return tqdm(items, total=len(items), file=sys.stderr, desc="decode", leave=False)

    report, structures = decode_texts(tokenizer, texts, labels, progress=progress)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for index, structure in enumerate(structures):
            if structure is not None:
                structure.to(filename=str(out / f"{index:06d}.cif"))
    for failure in report.failures[: args.failures]:
        print(f"row {failure['index']}: {failure['error']}: {failure['message'][:200]}", file=sys.stderr)
    result = report.to_dict()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0
