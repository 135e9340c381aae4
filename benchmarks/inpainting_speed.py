"""CrystalMLM speed on CPU: inpainting crystals/s, and training tokens/s vs an equal-size BertForMaskedLM.

Both models take the same corrupted batches of the bundled MP-20 sample (masked species, σ̃ = 0.1
coordinate noise; BERT sees the ids only) and the same AdamW step; sizes are those of
``training/configs/crystal_mlm_small.yaml``. Weights are freshly initialised: speed does not depend on them.

    python benchmarks/inpainting_speed.py [--crystals 200] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _machine import machine_line  # noqa: E402

SAMPLE = ROOT / "crystal_tokenizers" / "data" / "mp20_sample.csv"
CONFIG = ROOT / "training" / "configs" / "crystal_mlm_small.yaml"


def load_structures(n: int) -> list:
    """The first ``n`` crystals of the bundled sample."""
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Structure.from_str(cif, fmt="cif") for cif in pd.read_csv(SAMPLE)["cif"].head(n)]


def models(tokenizer, config: Path = CONFIG) -> tuple[torch.nn.Module, torch.nn.Module]:
    """CrystalMLMForMaskedLM of the small config and a BertForMaskedLM of the same width, depth and vocabulary."""
    from transformers import BertConfig, BertForMaskedLM

    from modeling.configuration_crystal_mlm import CrystalMLMConfig
    from modeling.modeling_crystal_mlm import CrystalMLMForMaskedLM

    sizes = yaml.safe_load(config.read_text())["model"]["config"]
    torch.manual_seed(0)
    mlm = CrystalMLMForMaskedLM(CrystalMLMConfig.from_tokenizer(tokenizer, **sizes))
    bert = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=sizes["n_embd"], num_hidden_layers=sizes["n_layer"],
        num_attention_heads=sizes["n_head"], intermediate_size=sizes["n_inner"], max_position_embeddings=sizes["n_positions"],
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=tokenizer.pad_token_id,
    ))
    return mlm, bert


def training_tokens_per_second(model: torch.nn.Module, batches: list[dict], keys: tuple[str, ...], warmup: int = 2) -> float:
    """Real (non-pad) tokens per second of forward + backward + AdamW over ``batches``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    tokens, seconds = 0, 0.0
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model(**{k: batch[k] for k in keys}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    return tokens / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crystals", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--config", type=Path, default=CONFIG, help="training config whose model sizes are used")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from crystal_tokenizers import WyckoffTokenizer
    from crystal_tokenizers.wyckoff.masking import MaskingSpec
    from training.objectives import MaskedReconstruction
    from training.data import CrystalCollator
    from training.inpaint import inpaint, inpaint_requests, plan_request

    tokenizer = WyckoffTokenizer()
    mlm, bert = models(tokenizer, args.config)
    structures = load_structures(args.crystals)

    start = time.perf_counter()
    texts = [tokenizer.structure_to_string(s) for s in structures]
    encode_s = time.perf_counter() - start
    import numpy as np

    rng = np.random.default_rng(0)
    requests = [plan_request(t, tokenizer, mask_fraction=0.3, noise=0.1, rng=rng) for t in texts]
    start = time.perf_counter()
    inpaint_requests(mlm, tokenizer, requests, top_k=5)
    model_s = time.perf_counter() - start
    start = time.perf_counter()
    inpaint(structures, mlm, tokenizer, mask_fraction=0.3, noise=0.1, top_k=5)
    end_to_end_s = time.perf_counter() - start

    objective = MaskedReconstruction(tokenizer, MaskingSpec(noise_scale=0.1))
    collate = objective.collator(CrystalCollator(tokenizer, max_length=256))
    rows = [{"text": t} for t in texts]
    batches = [collate(rows[(i * args.batch_size) % len(rows):][:args.batch_size]) for i in range(args.steps)]
    mlm_tps = training_tokens_per_second(mlm, batches, ("input_ids", "numeric_values", "attention_mask", "labels", "numeric_labels"))
    bert_tps = training_tokens_per_second(bert, batches, ("input_ids", "attention_mask", "labels"))

    n = len(structures)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(machine_line())
    print(f"model sizes of {args.config.name}; {n} crystals of {SAMPLE.name}; mask 30 % of orbits, σ̃ = 0.1, top-5; batches of {args.batch_size}, {args.steps} steps")
    print("| figure | value |")
    print("|---|---|")
    print(f"| inpainting, Structure in -> top-5 Structures out (crystals/s) | {n / end_to_end_s:.1f} |")
    print(f"| inpainting from token text (model + decoding, crystals/s) | {n / model_s:.1f} |")
    print(f"| encoding only (spglib + tokenizer, crystals/s) | {n / encode_s:.1f} |")
    print(f"| training CrystalMLMForMaskedLM ({params(mlm) / 1e6:.2f} M params, tokens/s) | {mlm_tps:.0f} |")
    print(f"| training BertForMaskedLM ({params(bert) / 1e6:.2f} M params, tokens/s, baseline) | {bert_tps:.0f} |")
    print(f"| ratio CrystalMLM / BERT | {mlm_tps / bert_tps:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
