"""``crystal-lm finetune``: add property conditions to a saved MatterGPT or WyckoffGPT and fine-tune it (LoRA or full)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from training.commands._output import stdout_for_json

HELP = "Fine-tune a saved MatterGPT or WyckoffGPT on new property conditions (PEFT LoRA with --lora, else all weights)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``finetune``."""
    parser.add_argument("--base", required=True, help="saved MatterGPT or WyckoffGPT folder (with its tokenizer)")
    parser.add_argument("--base-id", help="the base's Hub id, named in adapter_config.json and the card "
                        "(default: the base folder's name in the card, its local path in adapter_config.json)")
    parser.add_argument("--data", required=True,
                        help="CSV with a cif column (WyckoffGPT), or a slices/slices_plus/text or cif column (MatterGPT)")
    parser.add_argument("--property", required=True, help="comma-separated property columns, e.g. bulk_modulus_gpa,shear_modulus_gpa")
    parser.add_argument("--out", required=True, help="output folder (adapter or full model + tokenizer)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters + the new property embedding only")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--max-steps", type=int, default=200, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="rows with longer token strings are dropped")
    parser.add_argument("--limit", type=int, help="use a random subset of this many rows (few-shot)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")


def run(args: argparse.Namespace) -> int:
    """Fine-tune and print where the adapter went and how to load it."""
    from training.finetune import FinetuneConfig, FinetuneError, finetune

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = FinetuneConfig(
        lora=args.lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lr=args.lr,
        max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length,
        limit=args.limit, seed=args.seed,
    )
    properties = [name.strip() for name in args.property.split(",") if name.strip()]
    with stdout_for_json(args.json) as stdout:
        try:
            result = finetune(args.base, args.data, properties, args.out, config, base_id=args.base_id)
        except FinetuneError as err:
            print(f"crystal-lm finetune: {err}", file=sys.stderr)
            return 2
        print(f"fine-tuned {result.trainable_parameters:,} of {result.total_parameters:,} parameters on "
              f"{result.rows_used} rows for {result.steps} steps (final loss {result.final_loss})")
        print(f"saved to {result.out_dir}; sample with: crystal-lm generate --model {result.out_dir} "
              + " ".join(f"--property {name}={mean:.4g}" for name, mean in zip(result.property_names, result.property_means)))
    if args.json:
        print(json.dumps({"out_dir": str(result.out_dir), "rows_used": result.rows_used, "steps": result.steps,
                          "final_loss": result.final_loss, "property_names": list(result.property_names),
                          "property_means": list(result.property_means), "property_stds": list(result.property_stds),
                          "trainable_parameters": result.trainable_parameters}), file=stdout)
    return 0
