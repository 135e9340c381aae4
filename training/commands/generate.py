"""``crystal-lm generate``: sample crystals from a WyckoffGPT or a MatterGPT and write them as CIF files.

``--model`` is a saved model folder or a fine-tune's adapter folder (``crystal-lm finetune --lora``: the
adapter is loaded on its base). The folder's tokenizer decides: a Wyckoff tokenizer takes its conditions
as prompt text (``--crystal-system``, ``--space-group``, ``--elements``, ``--composition``,
``--property NAME=VALUE`` for its ``prop:`` tokens); a SLICES-PLUS tokenizer (MatterGPT) takes
``--crystal-system`` and ``--property NAME=VALUE`` as ``generate`` keyword arguments.
"""

from __future__ import annotations

from crystal_tokenizers.loading import load_tokenizer

import argparse
import json
import sys
from pathlib import Path

from training.commands._output import stdout_for_json
from training.conditions import ConditionError
from training.io import write_samples

HELP = "Sample crystals from a WyckoffGPT or MatterGPT (grammar-constrained), write CIFs and print counts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model folder or fine-tuned adapter folder (with its tokenizer)")
    parser.add_argument("--n", type=int, default=100, help="number of samples")
    parser.add_argument("--crystal-system", help="condition: cubic, hexagonal, trigonal, tetragonal, ...")
    parser.add_argument("--space-group", type=int, help="condition: space-group number 1-230")
    parser.add_argument("--elements", help="condition: chemical system, e.g. Li,Fe,O")
    parser.add_argument("--composition", help="condition: conventional-cell counts, e.g. Na:4,Cl:4")
    parser.add_argument("--property", action="append", default=[], metavar="NAME=VALUE",
                        help="property condition in the model's units, e.g. formation_energy_per_atom=-2.0 (repeatable)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (tokens and values)")
    parser.add_argument("--top-k", type=int, default=50, help="MatterGPT: sample among the k likeliest tokens")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-grammar", action="store_true", help="sample without the grammar constraint")
    parser.add_argument("--symmetry-mode", choices=("graph", "group"), default="graph",
                        help="MatterGPT (SLICES-PLUS): 'graph' writes only operations that act on the sampled graph; "
                             "'group' writes a closed point group of --crystal-system and the decoder imposes it")
    parser.add_argument("--no-coordination", action="store_true",
                        help="MatterGPT: ignore the tokenizer's per-element degree limits and bonded element pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the CIF files (sample_00000.cif, ...) and samples.csv")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON on the last line")
    ranking = parser.add_argument_group("predictor-ranked sampling (Con-CDVAE: generate n, keep the best)")
    ranking.add_argument("--keep", type=int, help="keep the KEEP samples a predictor ranks closest to --target")
    ranking.add_argument("--rank-by", help="name of the property the predictor gives (a label for the output)")
    ranking.add_argument("--target", type=float, help="target value of --rank-by, in the predictor's units")
    ranking.add_argument("--predictor", help="saved sequence-classification/regression model folder with its tokenizer")


def sampler(args: argparse.Namespace, model, tokenizer):
    """``(sample(size, progress) -> list[GeneratedCrystal], prompt text)`` for the model's kind."""
    from crystal_tokenizers import PromptCrystalTokenizer
    from training.conditions import check_graph_conditions, parse_composition, parse_properties
    from training.sampling import describe_conditions, generate_crystals, generate_graph_crystals

    if isinstance(tokenizer, PromptCrystalTokenizer):  # Wyckoff: conditions are prompt text
        properties = parse_properties(args.property)
        unknown = sorted(set(properties) - set(tokenizer.property_names))
        if unknown:
            raise ConditionError(f"this Wyckoff model has no property tokens for {unknown}; it knows "
                                 f"{list(tokenizer.property_names)}")
        prompt = tokenizer.condition_prefix(
            crystal_system=args.crystal_system, space_group=args.space_group,
            elements=args.elements.split(",") if args.elements else None,
            composition=parse_composition(args.composition) if args.composition else None,
            properties={name: properties[name] for name in tokenizer.property_names if name in properties},
        )  # properties in the tokenizer's order, as a fine-tune writes them

        def sample(size, progress=None):
            return generate_crystals(model, tokenizer, [prompt] * size, temperature=args.temperature,
                                     batch_size=args.batch_size, grammar=not args.no_grammar, progress=progress)

        return sample, prompt
    given = [flag for flag, value in (("--space-group", args.space_group), ("--elements", args.elements),
                                       ("--composition", args.composition)) if value]
    if given:
        raise ConditionError(f"{', '.join(given)} condition a Wyckoff model; this is a MatterGPT")
    properties = parse_properties(args.property)
    check_graph_conditions(model.config, args.crystal_system, properties)

    def sample(size, progress=None):
        return generate_graph_crystals(
            model, tokenizer, size, crystal_system=args.crystal_system, properties=properties,
            temperature=args.temperature, top_k=args.top_k, batch_size=args.batch_size,
            grammar=not args.no_grammar, symmetry_mode=args.symmetry_mode,
            coordination=not args.no_coordination, progress=progress,
        )

    return sample, describe_conditions(args.crystal_system, properties)


def run(args: argparse.Namespace) -> int:
    with stdout_for_json(args.json) as stdout:
        counts = _generate(args)
    if counts is None:
        return 2
    if args.json:
        print(json.dumps(counts), file=stdout)
    return 0


def _generate(args: argparse.Namespace) -> dict | None:
    """Sample (and rank), write, print the human summary; return the counts, or None after a usage error."""
    import torch
    from tqdm.auto import tqdm
    from training.evaluate import is_structurally_valid
    from training.finetune import load_finetuned

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = load_finetuned(args.model)  # a full model folder, or an adapter folder on its base
    try:
        sample, prompt = sampler(args, model, tokenizer)
    except (argparse.ArgumentTypeError, ValueError) as err:
        print(f"crystal-lm generate: {err}", file=sys.stderr)
        return None

    def progress(iterable, total):
        return tqdm(iterable, total=total, desc="batches", file=sys.stderr)

    if args.keep:
        return _run_ranked(args, sample, prompt, progress)
    samples = sample(args.n, progress)
    decoded = [s for s in samples if s.structure is not None]
    valid = sum(is_structurally_valid(s.structure) for s in decoded)
    if args.out:
        write_samples(Path(args.out), samples, args.crystal_system)
    counts = {"sampled": len(samples), "decoded": len(decoded), "valid": valid, "prompt": prompt}
    print(f"sampled {counts['sampled']}  decoded {counts['decoded']}  valid {counts['valid']}  (prompt: {prompt})")
    return counts


def _run_ranked(args: argparse.Namespace, sample, prompt: str, progress) -> dict | None:
    """Sample ``--n`` crystals in batches, stream them to ``--out``, keep the ``--keep`` best by the predictor."""
    from training.predictors import load_predictor
    from training.ranking import generate_ranked

    if not (args.rank_by and args.target is not None and args.predictor and args.out):
        print("crystal-lm generate: --keep needs --rank-by, --target, --predictor and --out", file=sys.stderr)
        return None

    def sample_fn(size: int):
        return [crystal.structure for crystal in sample(size)]

    result = generate_ranked(sample_fn, load_predictor(args.predictor), n=args.n, keep=args.keep, target=args.target,
                             batch_size=args.batch_size, out_dir=args.out, progress=progress)
    counts = {
        "sampled": result.sampled, "decoded": result.decoded, "scored": result.scored, "kept": len(result.kept),
        "rank_by": args.rank_by, "target": args.target,
        "best_deviation": result.kept[0].deviation if result.kept else None, "prompt": prompt,
    }
    print(f"sampled {counts['sampled']}  decoded {counts['decoded']}  kept {counts['kept']} closest to "
          f"{args.rank_by} = {args.target}  (files in {args.out})")
    return counts
