"""Fuzz the SLICES(-PLUS) decoder: every string must give a Structure or a CrystalDecodeError, in time.

Three kinds of strings, in equal parts: token soup drawn from the vocabulary, random grammatical
graphs (1-24 nodes, random edges, labels and symmetry groups), and real SLICES-PLUS strings of the
bundled MP-20 sample with tokens dropped, repeated or replaced. Prints one table: counts per outcome,
crashes (any other exception) and the slowest decode against the time box.

    OMP_NUM_THREADS=1 python benchmarks/slices_fuzz.py --n 10000 --time-limit 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
import traceback
import warnings
from collections import Counter
from importlib import resources

import pandas as pd
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalDecodeError
from crystal_tokenizers.slices import codec
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer


def token_soup(rng: random.Random, vocabulary: list[str]) -> str:
    """Up to 80 tokens drawn uniformly from the vocabulary (specials excluded)."""
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 80)))


def random_graph(rng: random.Random) -> str:
    """A grammatical SLICES-PLUS string with random nodes, edges and operations."""
    n = rng.randint(1, 24)
    species = [rng.choice(codec.ELEMENT_SYMBOLS[:94]) for _ in range(n)]
    labels = list(codec.OFFSET_LABELS)
    edges = [f"{rng.randrange(n)} {rng.randrange(n)} " + " ".join(rng.choice(labels) for _ in range(3))
             for _ in range(rng.randint(1, 4 * n))]
    groups = [" ".join([rng.choice(list(codec.ROTATION_ROWS)) for _ in range(3)]
                       + [rng.choice(list(codec.TRANSLATION_CODES)) for _ in range(3)]) for _ in range(rng.randint(0, 6))]
    if groups and rng.random() < 0.5:
        groups.insert(0, "i u y 1s 1s 1s")
    return " ".join(species + edges + groups)


def mutate(rng: random.Random, text: str, vocabulary: list[str]) -> str:
    """A real string with 1-5 tokens dropped, repeated or replaced."""
    tokens = text.split()
    for _ in range(rng.randint(1, 5)):
        k = rng.randrange(len(tokens))
        action = rng.choice(("drop", "repeat", "replace"))
        if action == "drop" and len(tokens) > 1:
            del tokens[k]
        elif action == "repeat":
            tokens.insert(k, tokens[k])
        else:
            tokens[k] = rng.choice(vocabulary)
    return " ".join(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--time-limit", type=float, default=2.0, help="decode time box (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="JSON file rewritten every 100 strings with the counts so far")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rng = random.Random(args.seed)
    tokenizer = SlicesPlusTokenizer(decode_time_limit_s=args.time_limit)
    vocabulary = [t for t in tokenizer.get_vocab() if not t.startswith("<")]
    with resources.as_file(resources.files("crystal_tokenizers").joinpath("data", "mp20_sample.csv")) as path:
        cifs = pd.read_csv(path, nrows=60).cif
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = [t for t in tokenizer.structures_to_strings(Structure.from_str(c, fmt="cif") for c in cifs) if isinstance(t, str)]
    outcomes: Counter[str] = Counter()
    slowest, slowest_text = 0.0, ""
    crashes: list[str] = []
    start = time.perf_counter()
    for k in range(args.n):
        kind = k % 3
        text = (token_soup(rng, vocabulary), random_graph(rng), mutate(rng, rng.choice(real), vocabulary))[kind]
        begin = time.perf_counter()
        try:
            tokenizer.string_to_structure(text)
            outcomes["Structure"] += 1
        except CrystalDecodeError as err:
            outcomes[type(err).__name__] += 1
        except Exception:  # a crash: anything outside the typed family
            outcomes["CRASH"] += 1
            crashes.append(f"{text[:200]!r}\n{traceback.format_exc(limit=3)}")
        if time.perf_counter() - begin > slowest:
            slowest, slowest_text = time.perf_counter() - begin, text
        if args.checkpoint and (k + 1) % 100 == 0:
            with open(args.checkpoint, "w") as handle:
                json.dump({"done": k + 1, "of": args.n, "seconds": round(time.perf_counter() - start, 1),
                           "slowest_s": round(slowest, 2), "slowest_text": slowest_text, "outcomes": dict(outcomes), "crashes": crashes[:5]},
                          handle, indent=1)
    total = time.perf_counter() - start
    print("| outcome | count |")
    print("|---|---|")
    for name, count in outcomes.most_common():
        print(f"| {name} | {count} |")
    print(f"\n{args.n} strings in {total:.0f} s; slowest decode {slowest:.2f} s (time box {args.time_limit} s); "
          f"crashes {outcomes['CRASH']}; machine: {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for crash in crashes[:5]:
        print(crash)


if __name__ == "__main__":
    main()
