"""Train a small WyckoffGPT on MP-20 rows with randomly drawn condition prefixes (acceptance run of issue 4).

Each epoch re-draws every crystal's prefix (Matra-Genoa-style conditioning by prefix tokens): none,
crystal system, space group, element set or exact composition, so one model samples unconditionally,
per crystal system and for structure prediction. A minimal AdamW loop (warm-up + cosine), one CPU
thread; it stops at ``--minutes`` of wall time and saves the model and tokenizer with ``save_pretrained``.

    OMP_NUM_THREADS=1 python benchmarks/wyckoff_gpt_train.py --csv ../shared/data/mp20_sample/train.csv \
        --out runs/wyckoff_gpt_small --minutes 25
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import pandas as pd
import torch
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalEncodeError
from crystal_tokenizers.tokenization_wyckoff import WyckoffTokenizer
from crystal_tokenizers.wyckoff import codec
from modeling.configuration_wyckoff_gpt import WyckoffGPTConfig
from modeling.modeling_wyckoff_gpt import WyckoffGPTForCausalLM

logger = logging.getLogger(__name__)

CONDITION_MIX = (("none", 0.3), ("crystal_system", 0.15), ("space_group", 0.1), ("elements", 0.15), ("composition", 0.3))
"""Probability of each prefix kind per crystal and epoch."""


def conditioned_text(crystal: codec.WyckoffCrystal, rng: random.Random) -> str:
    """The crystal's token text with a randomly drawn condition prefix (see ``CONDITION_MIX``)."""
    kind = rng.choices([k for k, _ in CONDITION_MIX], weights=[w for _, w in CONDITION_MIX])[0]
    conditions = codec.Conditions(
        crystal_system=crystal.crystal_system if kind == "crystal_system" else None,
        space_group=crystal.space_group if kind == "space_group" else None,
        elements=tuple(sorted({o.element for o in crystal.orbits})) if kind == "elements" else None,
        composition=tuple(crystal.composition().items()) if kind == "composition" else None,
    )
    tokens = codec.conditions_to_tokens(conditions) + [codec.SEP] + codec.crystal_to_tokens(crystal)
    return codec.tokens_to_text(tokens)


def length_bucketed_batches(texts: list[str], batch_size: int, rng: random.Random, pool: int = 16) -> list[list[str]]:
    """Shuffled batches of similar token length (sorted within pools of ``pool`` batches) to cut padding."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    batches = []
    for first in range(0, len(order), batch_size * pool):
        chunk = sorted(order[first:first + batch_size * pool], key=lambda i: len(texts[i].split()))
        batches += [[texts[i] for i in chunk[k:k + batch_size]] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def load_crystals(csv_path: Path, tokenizer: WyckoffTokenizer) -> list[codec.WyckoffCrystal]:
    """Encode every CIF of ``csv_path`` (rows that fail to encode are skipped and counted in the log)."""
    crystals, failures = [], 0
    for cif in pd.read_csv(csv_path)["cif"]:
        try:
            crystals.append(codec.structure_to_crystal(Structure.from_str(cif, fmt="cif"), symprec=tokenizer.symprec))
        except CrystalEncodeError:
            failures += 1
    logger.info("encoded %d crystals, %d failed", len(crystals), failures)
    return crystals


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = WyckoffTokenizer()
    crystals = load_crystals(Path(args.csv), tokenizer)
    config = WyckoffGPTConfig.from_tokenizer(
        tokenizer, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_inner=4 * args.n_embd,
        n_positions=1024,
    )
    model = WyckoffGPTForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget_s = 60.0 * args.minutes
    start = time.time()
    step, epoch, history = 0, 0, []
    model.train()
    while time.time() - start < budget_s:
        for texts in length_bucketed_batches([conditioned_text(c, rng) for c in crystals], args.batch_size, rng):
            elapsed = time.time() - start
            if elapsed >= budget_s:
                break
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            progress = min(elapsed / budget_s, 1.0)
            lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(**batch, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0:
                history.append({"step": step, "epoch": epoch, "elapsed_s": round(elapsed, 1), "loss": out.loss.item(),
                                "token_loss": out.token_loss.item(), "numeric_loss": out.numeric_loss.item()})
                logger.info("%s", history[-1])
            step += 1
        epoch += 1
    model.eval()
    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "crystals": len(crystals), "steps": step, "epochs": epoch, "wall_s": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()), "batch_size": args.batch_size,
        "n_layer": args.n_layer, "n_embd": args.n_embd, "torch_threads": torch.get_num_threads(), "history": history,
    }
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    summary = train(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
