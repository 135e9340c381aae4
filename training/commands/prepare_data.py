"""``crystal-lm prepare-data``: encode a crystal collection into a sharded Parquet dataset folder."""

from __future__ import annotations

import argparse
import sys

HELP = "Encode crystals (a CIF-column table, a CIF folder, a datasets folder or repo id) into sharded Parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``prepare-data``."""
    from training.data import DEFAULT_SHARD_SIZE, REPRESENTATIONS

    parser.add_argument("input", help="CSV/JSON/Parquet file, folder of CIFs, datasets folder or Hub repo id")
    parser.add_argument("--representation", choices=REPRESENTATIONS, default="wyckoff")
    parser.add_argument("--out", required=True, help="output folder (Hub dataset repo layout)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per Parquet shard")
    parser.add_argument("--num-proc", type=int, default=1, help="encoding processes")
    parser.add_argument("--cif-column", default="cif")
    parser.add_argument("--id-column", default=None, help="default: material_id/id/mp_id/name if present")
    parser.add_argument("--properties", default=None, help="comma-separated property columns (default: float columns)")
    parser.add_argument(
        "--conditions",
        default="",
        help="comma-separated text conditions (Wyckoff): crystal_system, space_group, elements, composition, "
        "stability, <property>",
    )
    parser.add_argument(
        "--split-fractions", default="0.8,0.1,0.1", help="train,validation,test when the input has no splits"
    )
    parser.add_argument("--license", default=None, help="override the licence read from the source")
    parser.add_argument(
        "--tokenizer", default=None, help="a saved tokenizer (path or repo id) instead of the default one"
    )
    parser.add_argument("--limit", type=int, default=None, help="encode only the first N rows")
    parser.add_argument("--failures", type=int, default=20, help="name up to N failed rows on stderr (all are in prepare_report.json)")


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset and print the counts and failure summary."""
    from training.data import EncodeOptions, make_tokenizer, prepare_dataset

    options = EncodeOptions(
        cif_column=args.cif_column,
        id_column=args.id_column,
        property_columns=_csv(args.properties),
        text_conditions=_csv(args.conditions),
    )
    report = prepare_dataset(
        args.input,
        args.out,
        representation=args.representation,
        tokenizer=make_tokenizer(args.representation, args.tokenizer),
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        options=options,
        split_fractions=tuple(float(f) for f in _csv(args.split_fractions)),
        license=args.license,
        limit=args.limit,
    )
    print(f"{'split':<12}{'encoded':>10}{'failed':>10}{'shards':>8}")
    for split, count in report.split_counts.items():
        print(f"{split:<12}{count:>10}{report.split_failures.get(split, 0):>10}{report.num_shards.get(split, 0):>8}")
    for error_type, count in sorted(report.failures_by_type.items(), key=lambda kv: -kv[1]):
        print(f"  {error_type}: {count}", file=sys.stderr)
    for failure in report.failures[: args.failures]:
        print(f"{failure.material_id}: {failure.error_type}: {failure.message[:200]}", file=sys.stderr)
    if len(report.failures) > args.failures:
        print(f"... and {len(report.failures) - args.failures} more (all in {args.out}/prepare_report.json)", file=sys.stderr)
    print(f"wrote {report.total_encoded} structures to {args.out} (licence {report.license})")
    return 0
