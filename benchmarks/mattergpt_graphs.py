"""Why MatterGPT samples decode too dense: the graphs of real strings vs sampled ones (issue 19).

For the training strings of a saved MatterGPT (``--strings``: a CSV column of SLICES-PLUS text) and for
``--n`` unconditioned samples of the model under the old grammar (no coordination limits) and under the
coordination table learned from those strings (per ``--quantile``), prints one table: nodes per string,
mean and 95th-percentile bonds per node, the share of nodes above the element's largest training
degree, the share of bonds joining an element pair no training graph bonds, loops per node, edges per
bonded node pair, the median short-cycle volume bound (Å³/atom, ``coordination.graph_volume_bound``;
``inf`` when a graph has no three independent short cycles), and, for the first
``--decode`` strings of each set, the decoded share and the median volume per atom (Å³/atom). The
baseline is the training strings in the same run; the ratio column is the sampled median Å³/atom over
the training strings'.

    OMP_NUM_THREADS=1 python benchmarks/mattergpt_graphs.py --model DIR --strings runs/mp20_encoded.csv
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._machine import machine_line  # noqa: E402
from crystal_tokenizers.errors import CrystalDecodeError  # noqa: E402
from crystal_tokenizers.slices.codec import parse_record  # noqa: E402
from crystal_tokenizers.slices.coordination import (  # noqa: E402
    CoordinationTable,
    graph_volume_bound,
    learn_coordination,
    node_degrees,
)
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer  # noqa: E402
from modeling.modeling_mattergpt import MatterGPTForCausalLM  # noqa: E402


def sample_texts(model, tokenizer: SlicesPlusTokenizer, n: int, batch_size: int,
                 coordination: CoordinationTable | None, temperature: float = 1.0) -> list[str]:
    """``n`` unconditioned samples (top-k 50, ``temperature``) under the grammar with ``coordination``."""
    texts = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        processor = tokenizer.grammar_processor(max_length=model.config.n_positions, coordination=coordination)
        out = model.generate(torch.full((size, 1), tokenizer.bos_token_id),
                             attention_mask=torch.ones(size, 1, dtype=torch.long), do_sample=True, top_k=50,
                             temperature=temperature,
                             max_length=model.config.n_positions, logits_processor=[processor],
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for ids in out.tolist():
            try:
                texts.append(tokenizer.ids_to_text(ids))
            except CrystalDecodeError:
                texts.append("")
    return texts


def graph_stats(texts: list[str], table: CoordinationTable) -> dict:
    """Node and bond statistics of the parsable ``texts`` against the (quantile 1.0) ``table``."""
    nodes, degrees, over, bonds, odd, parsed, loops, pairs, bounds = [], [], 0, 0, 0, 0, 0, 0, []
    for text in texts:
        try:
            graph = parse_record(text).graph
        except CrystalDecodeError:
            continue
        parsed += 1
        nodes.append(graph.num_nodes)
        d = node_degrees(graph)
        degrees += d
        over += sum(x > table.limit(s) for x, s in zip(d, graph.species))
        bonds += len(graph.edges)
        odd += sum(not table.bonds(graph.species[i], graph.species[j]) for i, j, *_ in graph.edges)
        loops += sum(i == j for i, j, *_ in graph.edges)
        pairs += len({(i, j) for i, j, *_ in graph.edges})
        bounds.append(graph_volume_bound(graph))
    return {"strings": len(texts), "parsed": parsed, "nodes_median": statistics.median(nodes) if nodes else None,
            "degree_mean": round(float(np.mean(degrees)), 2) if degrees else None,
            "degree_p95": float(np.percentile(degrees, 95)) if degrees else None,
            "over_limit_nodes": round(over / max(1, len(degrees)), 3),
            "unseen_pair_bonds": round(odd / max(1, bonds), 3),
            "loops_per_node": round(loops / max(1, len(degrees)), 3),
            "edges_per_bonded_pair": round(bonds / max(1, pairs), 2),
            "volume_bound_median": round(float(np.median(bounds)), 2) if bounds else None}


def density_stats(texts: list[str], tokenizer: SlicesPlusTokenizer) -> dict:
    """Decoded share and median volume per atom (Å³/atom) of ``texts``."""
    volumes, start = [], time.perf_counter()
    for text in texts:
        try:
            structure = tokenizer.string_to_structure(text)
        except CrystalDecodeError:
            continue
        volumes.append(structure.volume / len(structure))
    return {"decoded": round(len(volumes) / max(1, len(texts)), 3),
            "volume_per_atom_median": round(statistics.median(volumes), 2) if volumes else None,
            "decode_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="saved MatterGPT folder (with its tokenizer)")
    parser.add_argument("--strings", type=Path, required=True, help="CSV of the training strings")
    parser.add_argument("--column", default="slices_plus")
    parser.add_argument("--split", default="train", help="keep rows whose 'split' is this (if the column exists)")
    parser.add_argument("--n", type=int, default=200, help="samples per grammar variant")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--decode", type=int, default=40, help="strings of each set decoded for the density")
    parser.add_argument("--quantile", type=float, nargs="+", default=[1.0], help="quantiles of the degree table")
    parser.add_argument("--no-pairs", action="store_true", help="tables without the element-pair rule as well")
    parser.add_argument("--no-volume", action="store_true", help="tables without the short-cycle volume rule as well")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                        help="sampling temperatures (each learned-table variant is sampled at each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(args.seed)
    table = pd.read_csv(args.strings, keep_default_na=False)
    if "split" in table.columns:
        table = table[table.split == args.split]
    texts = [t for t in table[args.column] if t]
    tokenizer = SlicesPlusTokenizer()
    graphs = [parse_record(t).graph for t in texts]
    reference = learn_coordination(graphs, 1.0)
    model = MatterGPTForCausalLM.from_pretrained(args.model).eval()
    variants: list[tuple[str, CoordinationTable | None]] = [("old grammar", None)]
    for q in args.quantile:
        variants.append((f"degree q={q} + pairs + volume", learn_coordination(graphs, q)))
        if args.no_pairs:
            variants.append((f"degree q={q} + volume", learn_coordination(graphs, q, pairs=False)))
        if args.no_volume:
            variants.append((f"degree q={q} + pairs", learn_coordination(graphs, q, volume_quantile=None)))
    rows = [{"set": "training strings", **graph_stats(texts, reference), **density_stats(texts[:args.decode], tokenizer)}]
    runs = [(name, coordination, t) for name, coordination in variants
            for t in (args.temperature if coordination is not None else args.temperature[:1])]
    for name, coordination, temperature in runs:
        start = time.perf_counter()
        sampled = sample_texts(model, tokenizer, args.n, args.batch_size, coordination, temperature)
        row = {"set": f"samples, {name}, T={temperature}", "sample_s": round(time.perf_counter() - start, 1)}
        row.update(graph_stats(sampled, reference))
        row.update(density_stats([t for t in sampled if t][:args.decode], tokenizer))
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    out = pd.DataFrame(rows)
    base = out.volume_per_atom_median.iloc[0]
    out["volume_ratio_vs_training"] = (out.volume_per_atom_median / base).round(2)
    print(out.to_string(index=False))
    print(machine_line())


if __name__ == "__main__":
    main()
