"""Generation speed of WyckoffGPT with and without the grammar processor (ms per decoding step, batch 64).

Prints one table: ms/step with the grammar, the baseline without it (same model, same batch, same
number of steps), their ratio, and the time spent inside the grammar processor alone, plus the machine.

    OMP_NUM_THREADS=1 python benchmarks/wyckoff_generation.py [--model runs/wyckoff_gpt_small]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from transformers import LogitsProcessorList

from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from modeling.configuration_wyckoff_gpt import WyckoffGPTConfig
from modeling.modeling_wyckoff_gpt import WyckoffGPTForCausalLM
from training.sampling import encode_prompts


class _Timed:
    """Wraps a logits processor and accumulates the seconds spent in it."""

    def __init__(self, processor) -> None:
        self.processor, self.seconds, self.calls = processor, 0.0, 0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.processor(input_ids, scores)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def process_numeric_values(self, input_ids, numeric_values, proposals):
        start = time.perf_counter()
        out = self.processor.process_numeric_values(input_ids, numeric_values, proposals)
        self.seconds += time.perf_counter() - start
        return out


def run(model, tokenizer, batch_size: int, grammar: bool, max_new_tokens: int, min_new_tokens: int) -> tuple[float, float, int]:
    """(ms per step, ms per step inside the processor, steps) of one batched sampling run."""
    inputs = encode_prompts(tokenizer, ["<sep>"] * batch_size)
    max_length = inputs["input_ids"].shape[1] + max_new_tokens
    timed = _Timed(tokenizer.grammar_processor(max_length=max_length)) if grammar else None
    torch.manual_seed(0)
    start = time.perf_counter()
    out = model.generate(
        **inputs, max_length=max_length, min_new_tokens=min_new_tokens, do_sample=True, temperature=1.0,
        logits_processor=LogitsProcessorList([timed] if timed else []), return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=None if not grammar else tokenizer.eos_token_id,
    )
    seconds = time.perf_counter() - start
    steps = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    return 1000 * seconds / steps, (1000 * timed.seconds / steps) if timed else 0.0, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="saved WyckoffGPT folder (default: an untrained model of the small size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=180)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = WyckoffTokenizer()
    if args.model:
        model = WyckoffGPTForCausalLM.from_pretrained(args.model).eval()
    else:
        torch.manual_seed(0)
        model = WyckoffGPTForCausalLM(WyckoffGPTConfig.from_tokenizer(tokenizer, n_layer=4, n_embd=192, n_head=4, n_inner=768)).eval()
    run(model, tokenizer, 8, True, 40, 0)  # warm-up
    with_grammar, processor, steps = run(model, tokenizer, args.batch_size, True, args.max_new_tokens, 0)
    baseline, _, _ = run(model, tokenizer, args.batch_size, False, steps, steps)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"model: {'trained ' + args.model if args.model else 'untrained'}, {sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch_size}, {steps} steps")
    print("| figure | ms/step |")
    print("|---|---|")
    print(f"| sampling with grammar | {with_grammar:.1f} |")
    print(f"| baseline: sampling without grammar | {baseline:.1f} |")
    print(f"| ratio with/without | {with_grammar / baseline:.2f} |")
    print(f"| inside the grammar processor | {processor:.1f} |")


if __name__ == "__main__":
    main()
