"""``crystal-lm push``: upload a saved model (or a prepared dataset) folder with a filled card."""

from __future__ import annotations

import argparse

HELP = "Push a model folder (model + tokenizer + remote code + card) or a prepared dataset folder to the Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``push``."""
    parser.add_argument("folder", help="a saved model folder (e.g. RUN/final) or a prepare-data output folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--repo-type", choices=("model", "dataset"), default="model")
    parser.add_argument("--private", action="store_true")
    parser.add_argument(
        "--metrics", default=None, help="metrics JSON for the card (default: FOLDER/metrics.json or its parent's)"
    )
    parser.add_argument("--license", default="apache-2.0", help="licence of the model weights")
    parser.add_argument(
        "--dataset", action="append", default=[], help="Hub dataset id the model was trained on (repeatable)"
    )
    parser.add_argument("--local-dir", default=None, help="write the repo files here instead of uploading (offline)")


def run(args: argparse.Namespace) -> int:
    """Push and print the target."""
    from pathlib import Path

    from training.hub import push_folder, run_training_data

    folder = Path(args.folder)
    run_datasets, training_data = run_training_data(folder.parent)
    result = push_folder(
        folder,
        args.repo_id,
        repo_type=args.repo_type,
        private=args.private,
        local_dir=args.local_dir,
        metrics_path=args.metrics,
        license=args.license,
        datasets=tuple(args.dataset) or run_datasets,
        training_data=training_data,
    )
    print(f"{result.repo_type} {result.repo_id}: {len(result.files)} files -> {result.target}")
    return 0
