"""``crystal-lm train``: run the training loop from a YAML config (launch with ``accelerate launch`` to scale)."""

from __future__ import annotations

import argparse
import logging

HELP = "Train a crystal language model from a YAML config (Accelerate; --resume continues the newest checkpoint)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``train``."""
    parser.add_argument("--config", required=True, help="training config YAML (see training/configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--output-dir", default=None, help="override output_dir of the config")
    parser.add_argument("--max-steps", type=int, default=None, help="override loop.max_steps of the config")


def run(args: argparse.Namespace) -> int:
    """Train and print where the model went."""
    import dataclasses

    from training.loop import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig.from_yaml(args.config)
    if args.output_dir:
        config = dataclasses.replace(config, output_dir=args.output_dir)
    if args.max_steps:
        config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, max_steps=args.max_steps))
    result = train(config, resume=args.resume)
    best = "n/a" if result.best_eval_loss is None else f"{result.best_eval_loss:.4f}"
    print(f"trained {result.steps} steps (best eval loss {best}, stopped early: {result.stopped_early})")
    print(f"model + tokenizer: {result.final_model_dir}")
    return 0
