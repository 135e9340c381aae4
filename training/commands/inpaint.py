"""``crystal-lm inpaint``: which elements fit masked sites, and repair of noisy coordinates (CrystalMLM)."""

from __future__ import annotations

import argparse
import json
import logging

from training.chemistry import CHEMISTRY_MODES, DEFAULT_MODE, DEFAULT_PRIOR_WEIGHT

HELP = "Complete crystals with masked species (and noisy coordinates) using a masked CrystalMLM; writes top-k CIFs"


def _orbit_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--mask-sites takes comma-separated orbit indices, got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``inpaint``."""
    parser.add_argument("source", help="a CIF file, a folder of CIFs, or a CSV with a 'cif' column")
    parser.add_argument("--model", required=True, help="folder of a saved CrystalMLMForMaskedLM (with its tokenizer)")
    mask = parser.add_mutually_exclusive_group(required=True)
    mask.add_argument("--mask-element", help="mask every orbit of this element, e.g. O")
    mask.add_argument("--mask-fraction", type=float, help="mask this fraction of orbits at random, e.g. 0.3")
    mask.add_argument("--mask-sites", type=_orbit_list, help="mask these orbits (0-based, encoded order), e.g. 0,3")
    parser.add_argument("--noise", type=float, default=0.0, help="σ̃: displace coordinates by σ̃ × shortest edge, then denoise")
    parser.add_argument("--top-k", type=int, default=5, help="completions per crystal (default 5)")
    parser.add_argument("--out", default=None, help="write <name>/rank<k>_<formula>.cif and inpaint.json here")
    parser.add_argument("--chemistry", choices=CHEMISTRY_MODES, default=DEFAULT_MODE,
                        help="rank the model's candidates: soft = log-probability minus SMACT penalties (charge "
                             "neutrality with the unmasked part, orbit multiplicities), strict = SMACT-valid first, "
                             f"none = the plain model (default {DEFAULT_MODE})")
    parser.add_argument("--prior-weight", type=float, default=DEFAULT_PRIOR_WEIGHT,
                        help="soft/strict: add this weight x the element co-occurrence log-prior of the model's "
                             "training data (saved with its tokenizer by crystal-lm train; 0 = off; "
                             f"default {DEFAULT_PRIOR_WEIGHT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask and the noise")
    parser.add_argument("--json", action="store_true", help="print one JSON object per crystal")


def run(args: argparse.Namespace) -> int:
    """Complete every crystal of ``source`` and report the candidates."""
    from training.inpaint import inpaint_file

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = inpaint_file(
        args.source, args.model, mask_element=args.mask_element, mask_fraction=args.mask_fraction,
        mask_sites=args.mask_sites, noise=args.noise, top_k=args.top_k, out_dir=args.out, seed=args.seed,
        chemistry=args.chemistry, prior_weight=args.prior_weight,
    )
    for result in report.results:
        if args.json:
            print(json.dumps(result.to_dict()))
            continue
        if result.error:
            print(f"{result.name}: {result.error}")
            continue
        original = " ".join(result.original_species)
        print(f"{result.name}: masked orbits {list(result.masked_orbits)} (originally {original})")
        for rank, completion in enumerate(result.completions, start=1):
            species = " ".join(completion.species)
            print(f"  {rank}. p={completion.probability:.4f}  {species:<20} {completion.structure.composition.reduced_formula}")
    if args.out and not args.json:
        print(f"wrote {len(report.written)} CIFs and inpaint.json to {args.out}")
    return 1 if all(result.error for result in report.results) else 0
