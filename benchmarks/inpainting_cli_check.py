"""``crystal-lm inpaint`` as a user runs it, scored against always-"O" and element co-occurrence on the same masks.

Writes the first ``--crystals`` rows of mp_20/val.csv to a CSV, runs ``crystal-lm inpaint --mask-fraction
0.3 --top-k 1 --json`` once per ``--chemistry`` mode (none, soft, strict; the CLI's default is named), and
soft and strict again without the co-occurrence prior (``--prior-weight 0``), with a saved model, and
counts masked orbits whose
top-1 element is the original one. The baselines see the same masked orbits (read from the JSON):
always "O", and the element most often seen with the unmasked elements in the training split of a
prepared dataset (default: the pre-training union).

    python benchmarks/inpainting_cli_check.py --model runs/union/union-pretrain/final
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _machine import machine_line  # noqa: E402

VAL = ROOT.parent / "shared" / "data" / "mp_20" / "val.csv"


def run_cli(source: Path, model: Path, options: list[str], seed: int) -> list[dict]:
    """The JSON lines of one ``crystal-lm inpaint`` run with extra ``options`` (e.g. ``--chemistry soft``)."""
    from training.cli import main

    argv = ["inpaint", str(source), "--model", str(model), "--mask-fraction", "0.3", "--top-k", "1", "--json",
            "--seed", str(seed), *options]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train-data", type=Path, default=Path("runs/union/data/union"))
    parser.add_argument("--crystals", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from crystal_tokenizers import WyckoffTokenizer
    from crystal_tokenizers.wyckoff.masking import element_positions
    from training.chemistry import CHEMISTRY_MODES, DEFAULT_MODE, MaskContext, cooccurrence_baseline
    from training.data import load_split
    from training.inpaint import read_structures_file

    tokenizer = WyckoffTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "val100.csv"
        pd.read_csv(VAL).head(args.crystals).to_csv(source, index=False)
        names, structures = read_structures_file(source)
        variants = [["--chemistry", mode] for mode in CHEMISTRY_MODES]
        variants += [["--chemistry", mode, "--prior-weight", "0"] for mode in CHEMISTRY_MODES if mode != "none"]
        runs = {" ".join(options) + (" (default)" if options == ["--chemistry", DEFAULT_MODE] else ""):
                run_cli(source, args.model, options, args.seed) for options in variants}
    stats = WyckoffTokenizer().fit_training_statistics(load_split(args.train_data, "train")["text"])
    cooccurrence = cooccurrence_baseline(stats.frequency, stats.pairs)
    hits = {name: 0 for name in [*runs, "always O", "co-occurrence"]}
    orbits = completed = 0
    plain = next(iter(runs))
    for index, result in enumerate(runs[plain]):
        if result["error"]:
            continue
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(tokenizer.structure_to_string(structures[index]))["input_ids"])
        positions = [element_positions(tokens)[k] for k in result["masked_orbits"]]
        damaged = tuple("<mask>" if i in positions else t for i, t in enumerate(tokens))
        truth = result["original_species"]
        orbits += len(truth)
        for name, run in runs.items():
            best = run[index]["completions"][:1]
            completed += bool(best) and name == plain
            hits[name] += sum(a == b for a, b in zip(best[0]["species"], truth)) if best else 0
        hits["always O"] += sum(t == "O" for t in truth)
        (_, guess), = cooccurrence(MaskContext(damaged, tuple(positions), False), np.zeros((len(positions), 1)), ["O"], 1)
        hits["co-occurrence"] += sum(a == b for a, b in zip(guess, truth))
    print(machine_line())
    print(f"crystal-lm inpaint {VAL.name} first {args.crystals} crystals --mask-fraction 0.3 --top-k 1 "
          f"--model {args.model}; {completed} completed, {orbits} masked orbits")
    print("| method | top-1 element correct | accuracy | ratio vs always O | ratio vs co-occurrence |")
    print("|---|---|---|---|---|")
    for name, n in hits.items():
        print(f"| {name} | {n}/{orbits} | {n / orbits:.3f} | {n / max(hits['always O'], 1):.2f} | "
              f"{n / max(hits['co-occurrence'], 1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
