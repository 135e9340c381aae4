"""``crystal-lm demo``: prepare the bundled MP-20 sample, train a small WyckoffGPT on CPU, generate, evaluate.

Writes to ``--out`` (default ``outputs/demo``): ``data/`` (the prepared dataset), ``run/`` (checkpoints,
``metrics.csv``, ``final/`` model + tokenizer + ``README.md`` card), ``cifs/`` (the generated crystals and their ``samples.csv``),
``metrics.json`` + ``summary.md`` + PNG plots (from ``training.evaluate``), ``training_curve.png`` and
``MODEL_CARD.md``. Sized for about ten minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELP = "End-to-end demo: prepare the bundled MP-20 sample, train a small WyckoffGPT, generate 200 crystals, evaluate"

SAMPLE_CSV = Path(__file__).resolve().parents[2] / "crystal_tokenizers" / "data" / "mp20_sample.csv"
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "wyckoff_gpt_small.yaml"
DEMO_REPO_ID = "crystal-lm/wyckoff-gpt-mp20-sample-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``demo``."""
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument(
        "--config", default=str(DEMO_CONFIG), help="training config (data and output paths are replaced)"
    )
    parser.add_argument("--max-steps", type=int, default=1500, help="optimiser steps (1,500 take about 3 minutes on 2 idle cores)")
    parser.add_argument("--num-samples", type=int, default=200, help="crystals to generate")
    parser.add_argument("--batch-size", type=int, default=50, help="generation batch size")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="token budget of the samples drawn while training")
    parser.add_argument("--num-proc", type=int, default=2, help="processes for data preparation")
    parser.add_argument("--seed", type=int, default=0)


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - start
    print(f"[{name}] done in {timings[name]:.1f} s", file=sys.stderr)
    return result


def _plot_training_curve(metrics_csv: Path, path: Path) -> None:
    """Train and evaluation loss against optimiser step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    from matplotlib import pyplot as plt

    table = pd.read_csv(metrics_csv)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, style in (("train/loss", "-"), ("eval/loss", "o-")):
        part = table[table.name == name]
        ax.plot(part.step, part.value, style, label=name)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (token CE + value NLL)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run every stage, write the artefacts, print a summary table."""
    import torch
    from pymatgen.core import Structure
    from tqdm.auto import tqdm

    from training.data import load_split, prepare_dataset
    from training.evaluate import SPACEGROUP_KEY, evaluate_structures, write_report
    from training.hub import model_card, run_training_data
    from training.io import write_samples
    from training.loop import TrainConfig, train
    from training.sampling import generate_crystals

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    report = _timed(
        timings,
        "prepare",
        lambda: prepare_dataset(SAMPLE_CSV, out / "data", representation="wyckoff", num_proc=args.num_proc),
    )
    config = TrainConfig.from_yaml(args.config)
    every = max(1, args.max_steps // 2)
    config = dataclasses.replace(
        config,
        output_dir=str(out / "run"),
        seed=args.seed,
        data=dataclasses.replace(config.data, path=str(out / "data")),
        loop=dataclasses.replace(config.loop, max_steps=args.max_steps),
        eval=dataclasses.replace(config.eval, every_steps=every, num_samples=8, max_new_tokens=args.max_new_tokens),
        checkpoint=dataclasses.replace(config.checkpoint, every_steps=every),
    )
    shutil.rmtree(out / "run", ignore_errors=True)  # a demo always trains from scratch
    result = _timed(timings, "train", lambda: train(config))
    from crystal_tokenizers import WyckoffTokenizer

    tokenizer = WyckoffTokenizer.from_pretrained(str(result.final_model_dir))

    def progress_bar(iterable, total):
        return tqdm(iterable, total=total, desc="generating (batches)", file=sys.stderr)

    samples = _timed(
        timings,
        "generate",
        lambda: generate_crystals(result.model, tokenizer, [tokenizer.condition_prefix()] * args.num_samples,
                                  batch_size=args.batch_size, progress=progress_bar),
    )
    write_samples(out / "cifs", samples, crystal_system=None)
    structures = [sample.structure for sample in samples]
    reference = [Structure.from_str(cif, fmt="cif") for cif in load_split(out / "data", "train")["cif"]]
    evaluation = _timed(
        timings,
        "evaluate",
        lambda: evaluate_structures(
            structures, reference, targets={SPACEGROUP_KEY: [sample.space_group for sample in samples]},
            parse_errors=[None if sample.error is None else sample.error.split(":")[0] for sample in samples],
            progress=functools.partial(tqdm, file=sys.stderr),
        ),
    )
    write_report(evaluation, out)
    _plot_training_curve(out / "run" / "metrics.csv", out / "training_curve.png")
    run_datasets, training_data = run_training_data(out / "run")
    card = model_card(
        result.final_model_dir, DEMO_REPO_ID, metrics_path=out / "metrics.json", datasets=run_datasets,
        training_data=training_data,
    )
    (out / "MODEL_CARD.md").write_text(card)
    (result.final_model_dir / "README.md").write_text(card)

    rows = [
        (
            "structures prepared (train/validation)",
            f"{report.split_counts.get('train', 0)}/{report.split_counts.get('validation', 0)}",
        ),
        ("training steps", str(result.steps)),
        ("final train loss", f"{result.metrics.get('train/loss', float('nan')):.3f}"),
        ("best eval loss", "n/a" if result.best_eval_loss is None else f"{result.best_eval_loss:.3f}"),
        ("generated crystals", str(len(samples))),
        ("decoded to a structure", str(sum(s is not None for s in structures))),
        ("structural validity", f"{evaluation.structural_validity:.3f}"),
        ("compositional validity", f"{evaluation.compositional_validity:.3f}"),
        ("uniqueness (of valid)", "n/a" if evaluation.uniqueness is None else f"{evaluation.uniqueness:.3f}"),
        ("novelty (of valid)", "n/a" if evaluation.novelty is None else f"{evaluation.novelty:.3f}"),
        ("space group as declared (of valid)",
         "n/a" if evaluation.spg_consistency is None else f"{evaluation.spg_consistency:.3f}"),
    ]
    rows += [(f"time: {name} (s)", f"{seconds:.1f}") for name, seconds in timings.items()]
    rows.append(("time: total (s)", f"{sum(timings.values()):.1f}"))
    width = max(len(name) for name, _ in rows)
    print(f"\n{'crystal-lm demo':<{width}}  value\n{'-' * width}  -----")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nartefacts in {out}: cifs/, metrics.json, summary.md, *.png, MODEL_CARD.md, run/final/")
    return 0
