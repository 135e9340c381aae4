"""``crystal-lm csp``: crystal-structure prediction match rate and RMSE on a CSV of CIFs."""

from __future__ import annotations

from crystal_tokenizers.loading import load_tokenizer

import argparse
import json
import sys
from dataclasses import asdict

HELP = "Crystal-structure prediction: prompt with each composition (and template), report match rate and RMSE."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="CSV with a 'cif' column (e.g. MP-20 val.csv)")
    parser.add_argument("--model", required=True, help="saved model folder (with its tokenizer)")
    parser.add_argument("--template", action="store_true", help="also give the space group and Wyckoff orbits")
    parser.add_argument("--samples", type=int, default=1, help="samples per crystal (k)")
    parser.add_argument("--limit", type=int, help="use only the first N crystals")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch
    from pymatgen.core import Structure
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from training.sampling import predict_structures

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    cifs = pd.read_csv(args.file)["cif"].tolist()[: args.limit]
    structures = [Structure.from_str(cif, fmt="cif") for cif in cifs]
    result = predict_structures(
        model, tokenizer, structures, samples_per_crystal=args.samples, template=args.template,
        temperature=args.temperature, batch_size=args.batch_size,
        progress=lambda it, total: tqdm(it, total=total, desc="batches", file=sys.stderr),
    )
    rmse = "n/a" if result.mean_rmse is None else f"{result.mean_rmse:.4f}"
    print(
        f"crystals {result.n_crystals}  k={result.samples_per_crystal}  template={result.template}  "
        f"match rate {result.match_rate:.2%}  mean RMSE {rmse}  decoded samples {result.n_decoded_samples}/{result.n_samples}"
    )
    if args.json:
        print(json.dumps(asdict(result)))
    return 0
