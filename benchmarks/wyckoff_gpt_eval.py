"""Evaluate a trained WyckoffGPT (acceptance numbers of issue 4) and print one JSON summary.

1. ``--n`` unconditional samples: decodable, structural validity (all distances > 0.5 Å), SMACT charge
   neutrality, uniqueness and space-group consistency (spglib at symprec 0.1 equals the sampled group),
   via ``training.evaluate.evaluate_structures`` (the last three over CDVAE-valid samples, as there).
2. ``--per-system`` samples prompted with each crystal system: the crystal-system hit rate.
3. CSP on ``--csp-csv`` (first ``--csp-limit`` rows): with template (k=1, k=``--k``) and without (k=1, k=``--k``).

    OMP_NUM_THREADS=1 python benchmarks/wyckoff_gpt_eval.py --model runs/wyckoff_gpt_small \
        --csp-csv ../shared/data/mp20_sample/val.csv
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict

import pandas as pd
import torch
from pymatgen.core import Structure
from transformers import AutoModelForCausalLM, AutoTokenizer

from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS
from training.evaluate import evaluate_structures
from training.sampling import generate_crystals, predict_structures

logger = logging.getLogger(__name__)


def unconditional(model, tokenizer, n: int, temperature: float, batch_size: int) -> dict:
    start = time.time()
    samples = generate_crystals(model, tokenizer, ["<sep>"] * n, temperature=temperature, batch_size=batch_size)
    seconds = time.time() - start
    report = evaluate_structures(
        [s.structure for s in samples], targets={"spacegroup": [s.space_group for s in samples]},
        parse_errors=[s.error.split(":")[0] if s.error else None for s in samples],
    )
    return {
        "n": n, "decodable": sum(s.structure is not None for s in samples) / n,
        "structural_validity": report.structural_validity, "smact_validity": report.compositional_validity,
        "valid": report.validity, "uniqueness": report.uniqueness, "spg_consistency": report.spg_consistency,
        "distinct_space_groups": len({s.space_group for s in samples}), "sampling_s": round(seconds, 1),
        "structures_per_minute": round(60 * n / seconds, 1),
    }


def per_system(model, tokenizer, n: int, temperature: float, batch_size: int) -> dict:
    rates = {}
    for name in CRYSTAL_SYSTEMS:
        samples = generate_crystals(
            model, tokenizer, [tokenizer.condition_prefix(crystal_system=name)] * n,
            temperature=temperature, batch_size=batch_size,
        )
        report = evaluate_structures([s.structure for s in samples], targets={"crystal_system": name})
        rates[name] = {"hit_rate_valid": report.crystal_system_hit_rate, "valid": report.validity}
    return rates


def csp(model, tokenizer, csv: str, limit: int | None, k: int, temperature: float, batch_size: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [Structure.from_str(c, fmt="cif") for c in pd.read_csv(csv)["cif"].tolist()[:limit]]
    results = {}
    for template in (True, False):
        for samples in (1, k):
            start = time.time()
            result = predict_structures(
                model, tokenizer, structures, samples_per_crystal=samples, template=template,
                temperature=temperature, batch_size=batch_size,
            )
            results[f"{'template' if template else 'composition'}_k{samples}"] = {
                **asdict(result), "seconds": round(time.time() - start, 1),
            }
            logger.info("CSP %s", results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--per-system", type=int, default=100)
    parser.add_argument("--csp-csv")
    parser.add_argument("--csp-limit", type=int)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=(), choices=("unconditional", "systems", "csp"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    summary = {"model": args.model, "temperature": args.temperature, "torch_threads": torch.get_num_threads()}
    if "unconditional" not in args.skip:
        summary["unconditional"] = unconditional(model, tokenizer, args.n, args.temperature, args.batch_size)
        logger.info("%s", summary["unconditional"])
    if "systems" not in args.skip:
        summary["crystal_systems"] = per_system(model, tokenizer, args.per_system, args.temperature, args.batch_size)
        logger.info("%s", summary["crystal_systems"])
    if args.csp_csv and "csp" not in args.skip:
        summary["csp"] = csp(model, tokenizer, args.csp_csv, args.csp_limit, args.k, args.temperature, args.batch_size)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
