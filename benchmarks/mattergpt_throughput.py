"""Training and generation throughput of MatterGPT (dual and single flow) against GPT2LMHeadModel.

All models share depth, width, heads, feed-forward width, dropout and vocabulary, see the same random
batches, and are timed in alternation (median over repeats) so that load from other processes on a
shared machine hits them alike. Training = forward + backward + AdamW step; generation = greedy
decoding with the KV cache, a fixed number of new tokens per sequence.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mattergpt_throughput.py
"""

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from modeling.configuration_mattergpt import MatterGPTConfig
from modeling.modeling_mattergpt import MatterGPTForCausalLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-inner", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--train-steps", type=int, default=6, help="timed optimiser steps per repeat")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> dict[str, PreTrainedModel]:
    """GPT-2 baseline and MatterGPT (dual, single flow) with the same sizes, seeded identically."""
    sizes = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_inner=args.n_inner)
    special = dict(vocab_size=args.vocab_size, n_positions=args.seq_len + args.gen_tokens + 8, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
    models: dict[str, PreTrainedModel] = {}
    torch.manual_seed(0)
    models["GPT2LMHeadModel"] = GPT2LMHeadModel(
        GPT2Config(**sizes, **special, activation_function="gelu", attn_implementation="sdpa")
    )
    for name, dual in (("MatterGPT dual flow", True), ("MatterGPT single flow", False)):
        torch.manual_seed(0)
        models[name] = MatterGPTForCausalLM(
            MatterGPTConfig(**sizes, **special, dual_flow=dual, property_names=("formation_energy_per_atom",))
        )
    return models


def condition_kwargs(model: PreTrainedModel, batch_size: int) -> dict[str, torch.Tensor]:
    """Crystal system + formation energy (eV/atom) for MatterGPT, nothing for GPT-2."""
    if not isinstance(model, MatterGPTForCausalLM):
        return {}
    generator = torch.Generator().manual_seed(1)
    return {
        "crystal_system": torch.randint(0, 7, (batch_size,), generator=generator),
        "properties": -2.0 * torch.rand(batch_size, 1, generator=generator),
    }


def training_rate(model: PreTrainedModel, batches: list[torch.Tensor]) -> float:
    """Trained tokens per second over the given batches (one AdamW step each)."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-4)
    conditions = condition_kwargs(model, batches[0].shape[0])
    model(batches[0], labels=batches[0], **conditions).loss.backward()  # warm-up
    optimiser.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for batch in batches:
        model(batch, labels=batch, **conditions).loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def generation_rate(model: PreTrainedModel, prompts: torch.Tensor, new_tokens: int) -> float:
    """Generated tokens per second, greedy decoding with the KV cache."""
    model.eval()
    conditions = condition_kwargs(model, prompts.shape[0])
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **conditions, **kwargs)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - prompts.shape[1]) * prompts.shape[0] / elapsed


def median_over_repeats(models: dict[str, PreTrainedModel], measure: Callable[[PreTrainedModel], float],
                        repeats: int) -> dict[str, float]:
    """Median of ``measure`` per model, models measured in alternation within each repeat."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(measure(model))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.train_steps)]
    prompts = torch.full((args.gen_batch, 1), 1)
    models = build_models(args)
    train = median_over_repeats(models, lambda m: training_rate(m, batches), args.repeats)
    generate = median_over_repeats(models, lambda m: generation_rate(m, prompts, args.gen_tokens), args.repeats)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, os.cpu_count()={os.cpu_count()}, "
          f"torch {torch.__version__}, torch threads={torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"sizes: n_layer={args.n_layer} (per flow for MatterGPT), n_embd={args.n_embd}, n_head={args.n_head}, "
          f"n_inner={args.n_inner}, vocab={args.vocab_size}; train batch {args.batch_size}x{args.seq_len}, "
          f"{args.train_steps} steps; generation {args.gen_batch} sequences x {args.gen_tokens} new tokens; "
          f"median of {args.repeats}")
    baseline = "GPT2LMHeadModel"
    print(f"{'model':<24}{'params (M)':>11}{'train tok/s':>13}{'ratio':>8}{'gen tok/s':>11}{'ratio':>8}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<24}{params:>11.2f}{train[name]:>13.0f}{train[name] / train[baseline]:>8.2f}"
              f"{generate[name]:>11.0f}{generate[name] / generate[baseline]:>8.2f}")


if __name__ == "__main__":
    main()
