"""Training and generation throughput of WyckoffGPT, MatterGPT and CrystalMLM against equal-size baselines.

Every model has the same depth, width, heads, feed-forward width, dropout and vocabulary, sees the same
random batches, and is timed in alternation (median over repeats), so load from other processes on a shared
machine hits all alike. Training = forward + backward + AdamW step (tokens/s); generation = greedy decoding
with the KV cache, a fixed number of new tokens per sequence (tokens/s). Baselines: ``GPT2LMHeadModel`` for
both, and ``BertForMaskedLM`` for the masked model's training. WyckoffGPT's batches put ``<num>`` tokens with
values on a quarter of the positions, so its value embedding and value head do their real work.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_throughput.py [--repeats 3] [--clock cpu|wall]

The default clock is this process's CPU time (with one thread, the work done), so other jobs on a shared
machine do not move the figures; ``--clock wall`` times elapsed seconds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line

from modeling import (
    CrystalMLMConfig,
    CrystalMLMForMaskedLM,
    MatterGPTConfig,
    MatterGPTForCausalLM,
    WyckoffGPTConfig,
    WyckoffGPTForCausalLM,
)

CLOCK = time.process_time
NUM_ID, MASK_ID = 5, 4
KIND_IDS = {"fractional": [10, 11, 12], "length": [13, 14, 15], "angle": [16, 17, 18]}
ELEMENT_IDS = list(range(30, 130))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-inner", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--train-steps", type=int, default=5, help="timed optimiser steps per repeat")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU seconds (robust to other jobs on a shared machine; with one "
                             "thread it is the work done), wall: elapsed seconds")
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> dict[str, PreTrainedModel]:
    """Baselines and our three models with the same sizes, seeded identically."""
    sizes = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_inner=args.n_inner)
    special = dict(vocab_size=args.vocab_size, n_positions=args.seq_len + args.gen_tokens + 8, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
    builders: dict[str, Callable[[], PreTrainedModel]] = {
        "GPT2LMHeadModel": lambda: GPT2LMHeadModel(
            GPT2Config(**sizes, **special, activation_function="gelu", attn_implementation="sdpa")),
        "BertForMaskedLM": lambda: BertForMaskedLM(BertConfig(
            vocab_size=args.vocab_size, hidden_size=args.n_embd, num_hidden_layers=args.n_layer,
            num_attention_heads=args.n_head, intermediate_size=args.n_inner, pad_token_id=0,
            max_position_embeddings=args.seq_len + 8, attn_implementation="sdpa")),
        "WyckoffGPT": lambda: WyckoffGPTForCausalLM(WyckoffGPTConfig(
            **sizes, **special, num_token_id=NUM_ID, numeric_kind_token_ids=KIND_IDS)),
        "MatterGPT dual flow": lambda: MatterGPTForCausalLM(MatterGPTConfig(**sizes, **special, dual_flow=True)),
        "CrystalMLM": lambda: CrystalMLMForMaskedLM(CrystalMLMConfig(
            **sizes, vocab_size=args.vocab_size, n_positions=args.seq_len + 8, pad_token_id=0, num_token_id=NUM_ID,
            mask_token_id=MASK_ID, numeric_kind_token_ids=KIND_IDS, element_token_ids=ELEMENT_IDS)),
    }
    models = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        models[name] = build()
    return models


def with_values(ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every 4th token a fractional label followed by ``<num>`` with a value in [0, 1) (NaN elsewhere)."""
    ids = ids.clone()
    ids[:, 0::4] = KIND_IDS["fractional"][0]
    ids[:, 1::4] = NUM_ID
    values = torch.where(ids == NUM_ID, torch.rand(ids.shape, generator=generator), math.nan)
    return ids, values


def model_inputs(name: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward keyword arguments (with labels) of one model for one batch of random ids."""
    generator = torch.Generator().manual_seed(1)
    if name == "WyckoffGPT":
        ids, values = with_values(batch, generator)
        return {"input_ids": ids, "numeric_values": values, "labels": ids}
    if name == "MatterGPT dual flow":
        return {"input_ids": batch, "labels": batch, "crystal_system": torch.randint(0, 7, (batch.shape[0],)),
                "properties": -2.0 * torch.rand(batch.shape[0], 1, generator=generator)}
    if name in ("CrystalMLM", "BertForMaskedLM"):
        masked = torch.rand(batch.shape, generator=generator) < 0.15
        labels = torch.where(masked, batch, -100)
        ids = torch.where(masked, MASK_ID, batch)
        inputs = {"input_ids": ids, "labels": labels}
        if name == "CrystalMLM":
            ids, values = with_values(ids, generator)
            inputs.update(input_ids=ids, numeric_values=values, numeric_labels=values)
        return inputs
    return {"input_ids": batch, "labels": batch}


def training_rate(name: str, model: PreTrainedModel, batches: list[torch.Tensor]) -> float:
    """Trained tokens per second over the given batches (one AdamW step each)."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-4)
    inputs = [model_inputs(name, batch) for batch in batches]
    model(**inputs[0]).loss.backward()  # warm-up
    optimiser.zero_grad(set_to_none=True)
    start = CLOCK()
    for kwargs in inputs:
        model(**kwargs).loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return sum(b.numel() for b in batches) / (CLOCK() - start)


def generation_rate(name: str, model: PreTrainedModel, prompts: torch.Tensor, new_tokens: int) -> float:
    """Generated tokens per second, greedy decoding with the KV cache."""
    model.eval()
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                  attention_mask=torch.ones_like(prompts))
    if name == "WyckoffGPT":
        kwargs.update(numeric_values=torch.full(prompts.shape, math.nan), return_dict_in_generate=True)
    if name == "MatterGPT dual flow":
        kwargs.update(crystal_system=torch.randint(0, 7, (prompts.shape[0],)))
    start = CLOCK()
    with torch.no_grad():
        out = model.generate(prompts, **kwargs)
    elapsed = CLOCK() - start
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return (sequences.shape[1] - prompts.shape[1]) * prompts.shape[0] / elapsed


def measure_in_alternation(names: list[str], measure: Callable[[str], float], repeats: int) -> dict[str, list[float]]:
    """``repeats`` measurements per model, the models measured in alternation within each repeat."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            samples[name].append(measure(name))
    return samples


def paired_ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over repeats of ``name``'s rate divided by ``baseline``'s in the same repeat."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[baseline]))


def main() -> None:
    args = parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(30, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.train_steps)]
    prompts = torch.full((args.gen_batch, 1), 1)
    models = build_models(args)
    train = measure_in_alternation(list(models), lambda n: training_rate(n, models[n], batches), args.repeats)
    causal = [name for name, model in models.items() if hasattr(model, "generate") and model.can_generate()]
    generate = measure_in_alternation(causal, lambda n: generation_rate(n, models[n], prompts, args.gen_tokens),
                                   args.repeats)
    print(machine_line())
    print(f"sizes: n_layer={args.n_layer} (per flow for MatterGPT), n_embd={args.n_embd}, n_head={args.n_head}, "
          f"n_inner={args.n_inner}, vocab={args.vocab_size}; train batch {args.batch_size}x{args.seq_len}, "
          f"{args.train_steps} steps; generation {args.gen_batch} sequences x {args.gen_tokens} new tokens; "
          f"medians of {args.repeats} repeats (ratios: median of the same-repeat ratios); clock: {args.clock}")
    print(f"{'model':<22}{'params (M)':>11}{'train tok/s':>13}{'vs GPT-2':>9}{'vs BERT':>9}{'gen tok/s':>11}"
          f"{'vs GPT-2':>9}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gen = (f"{statistics.median(generate[name]):>11.0f}{paired_ratio(generate, name, 'GPT2LMHeadModel'):>9.2f}"
               if name in generate else "")
        print(f"{name:<22}{params:>11.2f}{statistics.median(train[name]):>13.0f}"
              f"{paired_ratio(train, name, 'GPT2LMHeadModel'):>9.2f}{paired_ratio(train, name, 'BertForMaskedLM'):>9.2f}"
              f"{gen}")

if __name__ == "__main__":
    main()
