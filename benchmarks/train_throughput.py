"""Benchmark: training throughput (tokens/s) of the loop with an in-memory (map-style) vs a streaming dataset.

Prepares the bundled MP-20 sample (Wyckoff), then alternates ``training.loop.train`` runs of the small
WyckoffGPT config (``--steps`` optimiser steps, evaluation off) between map-style and streaming (shuffle
buffer 10,000) for ``--rounds`` rounds, and prints one table: the median tokens/s of each (map-style is
the baseline) and their ratio, plus the data pipeline alone (rows/s: read, shuffle, batch, tokenize,
collate; no model), the machine and the load. Tokens are non-padding tokens; each run's first log window
(warm-up) is left out. Alternating rounds keep a shared machine's load changes from favouring one side.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line

from training.data import (
    CrystalCollator,
    iter_epoch,
    load_split,
    make_tokenizer,
    prepare_dataset,
)
from training.loop import METRICS_CSV, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "crystal_tokenizers" / "data" / "mp20_sample.csv"
CONFIG = ROOT / "training" / "configs" / "wyckoff_gpt_small.yaml"
BUFFER = 10_000


def _train_tokens_per_second(config: TrainConfig) -> float:
    """Median logged tokens/s of one run after its first log window."""
    train(config)
    table = pd.read_csv(Path(config.output_dir) / METRICS_CSV)
    return float(table[table.name == "train/tokens_per_second"].value.iloc[1:].median())


def _pipeline_epoch(data: Path, streaming: bool, batch_size: int) -> tuple[float, float]:
    """Rows/s and seconds of one epoch of batches, tokenized and collated, without a model.

    ``datasets`` 5.2 sleeps 5 s when the sources of a multi-shard shuffled stream end (a pyarrow
    thread-shutdown workaround): a fixed cost per streamed epoch, large only for a small dataset.
    """
    dataset = load_split(data, "train", streaming=streaming)
    collator = CrystalCollator(make_tokenizer("wyckoff"), max_length=256)
    start, rows = time.perf_counter(), 0
    for batch in iter_epoch(dataset, epoch=0, seed=0, batch_size=batch_size, shuffle_buffer=BUFFER):
        collator(batch)
        rows += len(batch)
    seconds = time.perf_counter() - start
    return rows / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    base = TrainConfig.from_yaml(CONFIG)
    rates: dict[bool, list[float]] = {False: [], True: []}
    pipeline: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_dataset(SAMPLE, data, representation="wyckoff")
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for streaming in order:
                config = dataclasses.replace(
                    base,
                    output_dir=str(Path(tmp) / f"run-{round_index}-{streaming}"),
                    data=dataclasses.replace(
                        base.data, path=str(data), streaming=streaming, eval_split=None, shuffle_buffer=BUFFER
                    ),
                    loop=dataclasses.replace(base.loop, max_steps=args.steps, log_every=2),
                    checkpoint=dataclasses.replace(base.checkpoint, every_steps=args.steps),
                    report_to=("csv",),
                )
                rates[streaming].append(_train_tokens_per_second(config))
                pipeline[streaming].append(_pipeline_epoch(data, streaming, base.loop.micro_batch_size))
    train_map, train_stream = statistics.median(rates[False]), statistics.median(rates[True])
    pipe_map, pipe_stream = (statistics.median(rate for rate, _ in pipeline[side]) for side in (False, True))
    epoch_map, epoch_stream = (statistics.median(seconds for _, seconds in pipeline[side]) for side in (False, True))
    print(
        f"training throughput: small WyckoffGPT (3 x 128), micro-batch {base.loop.micro_batch_size}, "
        f"{args.steps} steps x {args.rounds} rounds per side, 500 MP-20 training crystals"
    )
    print(f"{'':<34}{'map-style (baseline)':>22}{'streaming':>12}{'ratio':>8}")
    print(f"{'training, tokens/s (median)':<34}{train_map:>22.0f}{train_stream:>12.0f}{train_stream / train_map:>8.2f}")
    print(f"{'data pipeline only, rows/s':<34}{pipe_map:>22.0f}{pipe_stream:>12.0f}{pipe_stream / pipe_map:>8.2f}")
    print(
        f"{'data pipeline only, s per epoch':<34}{epoch_map:>22.2f}{epoch_stream:>12.2f}"
        f"{epoch_stream / epoch_map:>8.1f}"
    )
    print(machine_line() + f", load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
