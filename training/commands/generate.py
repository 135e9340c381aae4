"""``crystal-lm generate``: sample crystals from a Wyckoff model and write them as CIF files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "Sample crystals from a Wyckoff model (grammar-constrained), write CIFs and print counts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder (with its tokenizer)")
    parser.add_argument("--n", type=int, default=100, help="number of samples")
    parser.add_argument("--crystal-system", help="condition: cubic, hexagonal, trigonal, tetragonal, ...")
    parser.add_argument("--space-group", type=int, help="condition: space-group number 1-230")
    parser.add_argument("--elements", help="condition: chemical system, e.g. Li,Fe,O")
    parser.add_argument("--composition", help="condition: conventional-cell counts, e.g. Na:4,Cl:4")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (tokens and values)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-grammar", action="store_true", help="sample without the grammar constraint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the CIF files (sample_00000.cif, ...)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON on the last line")


def parse_composition(text: str) -> dict[str, int]:
    """``"Na:4,Cl:4"`` -> ``{"Na": 4, "Cl": 4}``."""
    counts = {}
    for item in text.split(","):
        element, _, count = item.strip().partition(":")
        if not count.isdigit():
            raise argparse.ArgumentTypeError(f"composition item {item!r} is not El:count")
        counts[element] = int(count)
    return counts


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import is_structurally_valid
    from training.sampling import generate_crystals

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    prompt = tokenizer.condition_prefix(
        crystal_system=args.crystal_system, space_group=args.space_group,
        elements=args.elements.split(",") if args.elements else None,
        composition=parse_composition(args.composition) if args.composition else None,
    )
    samples = generate_crystals(
        model, tokenizer, [prompt] * args.n, temperature=args.temperature, batch_size=args.batch_size,
        grammar=not args.no_grammar,
        progress=lambda it, total: tqdm(it, total=total, desc="batches", file=sys.stderr),
    )
    decoded = [s for s in samples if s.structure is not None]
    valid = sum(is_structurally_valid(s.structure) for s in decoded)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for index, sample in enumerate(samples):
            if sample.structure is not None:
                sample.structure.to(filename=str(out / f"sample_{index:05d}.cif"))
    counts = {"sampled": len(samples), "decoded": len(decoded), "valid": valid, "prompt": prompt}
    print(f"sampled {counts['sampled']}  decoded {counts['decoded']}  valid {counts['valid']}  (prompt: {prompt})")
    if args.json:
        print(json.dumps(counts))
    return 0
