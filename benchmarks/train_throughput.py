"""Benchmark: training throughput (tokens/s) of the loop with an in-memory (map-style) vs a streaming dataset.

Prepares the bundled MP-20 sample (Wyckoff), then runs ``training.loop.train`` twice with the small
WyckoffGPT config for ``--steps`` optimiser steps, evaluation off, and prints one table: tokens/s of the
map-style run (the baseline), of the streaming run (shuffle buffer 10,000), and their ratio, plus the
machine and load. Tokens are non-padding tokens; the first log window (warm-up) is left out.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line  # noqa: E402

from training.data import prepare_dataset  # noqa: E402
from training.loop import METRICS_CSV, TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "crystal_tokenizers" / "data" / "mp20_sample.csv"
CONFIG = ROOT / "training" / "configs" / "wyckoff_gpt_small.yaml"


def _tokens_per_second(config: TrainConfig) -> tuple[float, float]:
    """Median logged tokens/s after the first window, and tokens per CPU-second of this process."""
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    result = train(config)
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    table = pd.read_csv(Path(config.output_dir) / METRICS_CSV)
    rates = table[table.name == "train/tokens_per_second"].value.iloc[1:]
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    del result
    return float(rates.median()), 0.0 if cpu == 0 else _tokens_seen(config) / cpu


def _tokens_seen(config: TrainConfig) -> float:
    import json

    return float(json.loads((Path(config.output_dir) / "metrics.json").read_text())["tokens_seen"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_dataset(SAMPLE, data, representation="wyckoff")
        base = TrainConfig.from_yaml(CONFIG)
        results = {}
        for streaming in (False, True):
            config = dataclasses.replace(
                base,
                output_dir=str(Path(tmp) / f"run-{streaming}"),
                data=dataclasses.replace(base.data, path=str(data), streaming=streaming, eval_split=None),
                loop=dataclasses.replace(base.loop, max_steps=args.steps, log_every=5),
                checkpoint=dataclasses.replace(base.checkpoint, every_steps=args.steps),
                report_to=("csv",),
            )
            results[streaming] = _tokens_per_second(config)
    (base_wall, base_cpu), (stream_wall, stream_cpu) = results[False], results[True]
    print(f"training throughput, small WyckoffGPT ({base.model.config}), micro-batch {base.loop.micro_batch_size}, {args.steps} steps")
    print(f"{'dataset':<28}{'tokens/s (wall)':>18}{'tokens/CPU-s':>16}")
    print(f"{'map-style (baseline)':<28}{base_wall:>18.0f}{base_cpu:>16.0f}")
    print(f"{'streaming, buffer 10,000':<28}{stream_wall:>18.0f}{stream_cpu:>16.0f}")
    print(f"{'ratio streaming/map-style':<28}{stream_wall / base_wall:>18.2f}{stream_cpu / base_cpu:>16.2f}")
    print(machine_line() + f", load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
