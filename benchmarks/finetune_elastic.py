"""Few-shot K/G targeting (SLICES-PLUS paper, elastic fine-tune) at CPU scale.

Data: ``../shared/data/slices_plus_paper/elastic_cubic.csv`` (4,071 cubic crystals, plain SLICES, K_VRH and
G_VRH in GPa). Rows with 0 < K < 500 GPa, 0 < G < 300 GPa (mechanically unstable or absurd entries out)
and at most ``--max-len`` tokens are kept. A hash of the string splits them into a *judge* part
(``--judge-fraction``) and a *generator* part; the generator never sees a judge row and vice versa.

1. Base: a small dual-flow MatterGPT with **no** property conditions, pre-trained through the generic
   training loop on the generator part's strings (unconditioned language modelling).
2. Few-shot: ``training.finetune.finetune`` adds the conditions ``bulk_modulus_gpa, shear_modulus_gpa``
   and trains LoRA adapters + the new property embedding on ``--shots`` random generator rows.
3. Judge: a ``MatterGPTForSequenceClassification`` regressor (2 outputs, standardised K and G) trained on
   the judge part; its MAE on a held-out 10 % of the judge part is printed.
4. For each target (K, G) = (200, 100) and (50, 30) GPa, and for the unconditioned base (the baseline),
   ``--samples`` strings are drawn, decoded (plain-SLICES decoder), labelled by spglib (symprec 0.1) and
   the decoded structures, re-encoded, are judged (and, as a token-level check of the conditioning,
   every sampled string as it is). The same judging of real judge-part strings is the
   reference (what the decoder and spglib give for true cubic crystals). Sampling goes through the SLICES
   grammar ``LogitsProcessor`` (``--grammar off`` / ``--no-grammar``: without it; ``both``: each target twice).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_elastic.py --pretrain-steps 300 --finetune-steps 150
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mattergpt_experiments import (
    JUDGE_SYMPREC,
    hash_split,
    log,
    pad,
    predict,
    spglib_crystal_system,
    token_ids,
    train_budgeted,
)

from crystal_tokenizers import CrystalError
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer
from modeling.configuration_mattergpt import MatterGPTConfig
from modeling.modeling_mattergpt import (
    MatterGPTForCausalLM,
    MatterGPTForSequenceClassification,
)
from training.finetune import (
    SUMMARY_FILE,
    FinetuneConfig,
    condition_tensors,
    finetune,
    load_finetuned,
    write_training_split,
)
from training.loop import train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT_DIR = Path(__file__).resolve().parents[1] / "outputs" / "finetune_elastic"
PROPERTIES = ("bulk_modulus_gpa", "shear_modulus_gpa")
TARGETS = ((200.0, 100.0), (50.0, 30.0))
"""(K, G) targets in GPa, as in the SLICES-PLUS paper."""
MODEL_SIZE = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_inner": 512}
"""Blocks per flow, heads, width, feed-forward width (paper: 8/8/512/2048), sized for shared CPUs."""


def load_rows(max_len: int, tokenizer: SlicesPlusTokenizer, judge_fraction: float) -> pd.DataFrame:
    """Physical rows of at most ``max_len`` tokens (BOS/EOS included), with their part (judge/generator)."""
    table = pd.read_csv(SHARED_DATA / "slices_plus_paper" / "elastic_cubic.csv")
    table = table[(table.bulk_modulus_gpa > 0) & (table.bulk_modulus_gpa < 500)
                  & (table.shear_modulus_gpa > 0) & (table.shear_modulus_gpa < 300)]
    table = table.drop_duplicates("slices")
    lengths = table.slices.map(lambda text: len(tokenizer.tokenize(text)) + 2)
    table = table[lengths <= max_len].reset_index(drop=True)
    table["part"] = ["judge" if hash_split("judge:" + text, judge_fraction) else "generator" for text in table.slices]
    return table


def pretrain_base(texts: list[str], tokenizer: SlicesPlusTokenizer, steps: int, max_len: int) -> Path:
    """Unconditioned MatterGPT (no property names) trained by the generic loop; returns its folder."""
    run_dir = OUT_DIR / "base_run"
    write_training_split(texts, None, run_dir / "dataset" / "data")
    config = MatterGPTConfig(
        vocab_size=len(tokenizer), n_positions=max_len, **MODEL_SIZE, embd_pdrop=0.0, attn_pdrop=0.0,
        resid_pdrop=0.0, property_names=(), property_means=(), property_stds=(),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    result = train(
        {
            "output_dir": str(run_dir), "run_name": "elastic-base", "seed": 0,
            "data": {"path": str(run_dir / "dataset"), "eval_split": None, "max_length": max_len},
            "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 20, "schedule": "cosine"},
            "loop": {"micro_batch_size": 16, "max_steps": steps, "log_every": 25},
            "checkpoint": {"every_steps": min(steps, 500), "keep": 1},
        },
        model=MatterGPTForCausalLM(config), tokenizer=tokenizer,
    )
    log(f"base: {result.steps} steps, metrics {result.metrics}")
    return result.final_model_dir


def train_judge(judge: pd.DataFrame, tokenizer: SlicesPlusTokenizer, budget_s: float, max_len: int) -> tuple:
    """K/G regressor (standardised targets) on 90 % of the judge part; returns model, mean, std, val MAE (GPa)."""
    held_out = judge.slices.map(lambda text: hash_split("val:" + text, 0.1))
    fit, val = judge[~held_out], judge[held_out]
    values = fit[list(PROPERTIES)].to_numpy(dtype=np.float32)
    mean, std = values.mean(axis=0), values.std(axis=0)
    targets = torch.tensor((values - mean) / std)
    ids = token_ids(tokenizer, fit.slices.tolist())
    config = MatterGPTConfig(
        vocab_size=len(tokenizer), n_positions=max_len, **MODEL_SIZE, dual_flow=False, num_labels=2,
        problem_type="regression", condition_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MatterGPTForSequenceClassification(config)

    def step_loss(batch: list[int]) -> torch.Tensor:
        batch_ids, mask = pad([ids[i] for i in batch], tokenizer.pad_token_id)
        return model(batch_ids, attention_mask=mask, labels=targets[batch]).loss

    stats = train_budgeted(model, [len(s) for s in ids], step_loss, budget_s, max_tokens=4096)
    predicted = predict(model, tokenizer, val.slices.tolist(), max_len).numpy() * std + mean
    mae = np.abs(predicted - val[list(PROPERTIES)].to_numpy()).mean(axis=0)
    return model, mean, std, {"fit_rows": len(fit), "val_rows": len(val), "training": asdict(stats),
                              "val_mae_gpa": {p: round(float(m), 1) for p, m in zip(PROPERTIES, mae)}}


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer: SlicesPlusTokenizer, n: int, max_len: int,
           targets: dict[str, float] | None, batch_size: int = 50, grammar: bool = True,
           temperature: float = 1.0) -> list[str]:
    """``n`` strings (top-k 50 at ``temperature``); ``targets`` in GPa, ``None`` = unconditioned.

    ``grammar``: through the SLICES grammar ``LogitsProcessor`` in the published files' edge order (the
    order of the training strings), so that every string parses into a connected 3-periodic graph.
    """
    texts = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        kwargs = {}
        if targets is not None:
            kwargs["properties"], kwargs["property_mask"] = condition_tensors(model.config, targets, size)
        if grammar:
            kwargs["logits_processor"] = [tokenizer.grammar_processor(order="published", max_length=max_len)]
        out = model.generate(
            torch.full((size, 1), tokenizer.bos_token_id), attention_mask=torch.ones(size, 1, dtype=torch.long),
            do_sample=True, temperature=temperature, top_k=50, max_new_tokens=max_len - 1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
        )
        for ids in out.tolist():
            try:
                texts.append(tokenizer.ids_to_text(ids))
            except CrystalError:
                texts.append("")
    return texts


def judge_samples(texts: list[str], tokenizer: SlicesPlusTokenizer, judge: tuple, max_len: int) -> dict:
    """Decoded share, cubic share among decoded, medians of the judge's K and G on re-encoded structures."""
    model, mean, std = judge
    cubic, reencoded = [], []
    for text in texts:
        try:
            structure = tokenizer.string_to_structure(text)
        except CrystalError:
            continue
        cubic.append(spglib_crystal_system(structure, JUDGE_SYMPREC) == 0)
        try:
            reencoded.append(tokenizer.structure_to_string(structure))
        except CrystalError:
            pass
    fitting = [t for t in reencoded if len(tokenizer.tokenize(t)) + 2 <= max_len]
    predicted = predict(model, tokenizer, fitting, max_len).numpy() * std + mean if fitting else np.empty((0, 2))
    strings = [t for t in texts if t.strip()]
    raw = predict(model, tokenizer, strings, max_len).numpy() * std + mean if strings else np.full((1, 2), np.nan)
    return {
        "median_predicted_K_G_all_strings_gpa": [round(float(v), 1) for v in np.median(raw, axis=0)],
        "samples": len(texts),
        "decoded_share": round(len(cubic) / len(texts), 3),
        "cubic_share_of_decoded": round(sum(cubic) / len(cubic), 3) if cubic else None,
        "judged": len(fitting),
        "median_predicted_K_gpa": round(float(np.median(predicted[:, 0])), 1) if len(fitting) else None,
        "median_predicted_G_gpa": round(float(np.median(predicted[:, 1])), 1) if len(fitting) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=300, help="tokens per string incl. BOS/EOS")
    parser.add_argument("--judge-fraction", type=float, default=0.35)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--shots", type=int, default=300, help="few-shot fine-tuning rows")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--judge-budget-s", type=float, default=180.0)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (top-k 50)")
    parser.add_argument("--decode-time-limit-s", type=float, default=2.0)
    parser.add_argument("--reuse", action="store_true", help="reuse the saved base and adapter (skip 1-2)")
    parser.add_argument("--reuse-base", action="store_true", help="reuse the saved base, fine-tune anew (skip 1)")
    parser.add_argument("--grammar", choices=("on", "off", "both"), default="on",
                        help="sample through the SLICES grammar LogitsProcessor, without it, or both (same judge)")
    parser.add_argument("--no-grammar", dest="grammar", action="store_const", const="off", help="= --grammar off")
    parser.add_argument("--results-name", default="results", help="name of the results JSON in the output folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer = SlicesPlusTokenizer(symmetry=False, decode_time_limit_s=args.decode_time_limit_s)
    rows = load_rows(args.max_len, tokenizer, args.judge_fraction)
    generator, judge_part = rows[rows.part == "generator"], rows[rows.part == "judge"]
    log(f"rows kept {len(rows)}: generator {len(generator)}, judge {len(judge_part)}")
    results = {"grammar": args.grammar, "temperature": args.temperature,
               "rows_kept": len(rows), "generator_rows": len(generator), "judge_rows": len(judge_part),
               "max_len": args.max_len, "model_size": MODEL_SIZE, "shots": args.shots,
               "generator_median_K_G_gpa": [float(generator[p].median()) for p in PROPERTIES], "wall_s": {}}

    base_dir = OUT_DIR / "base_run" / "final"
    if args.reuse and (OUT_DIR / "adapter" / SUMMARY_FILE).exists():
        log(f"reusing {base_dir} and {OUT_DIR / 'adapter'}")
        results["finetune"] = json.loads((OUT_DIR / "adapter" / SUMMARY_FILE).read_text())
    else:
        if args.reuse_base:
            log(f"reusing {base_dir}")
            results["pretrain_steps"] = json.loads((OUT_DIR / "base_run" / "metrics.json").read_text())["steps"]
        else:
            shutil.rmtree(OUT_DIR / "base_run", ignore_errors=True)  # a fresh run of this benchmark
            t0 = time.perf_counter()
            base_dir = pretrain_base(generator.slices.tolist(), tokenizer, args.pretrain_steps, args.max_len)
            results["wall_s"]["pretrain"] = round(time.perf_counter() - t0, 1)
            results["pretrain_steps"] = args.pretrain_steps
        shutil.rmtree(OUT_DIR / "adapter", ignore_errors=True)
        t0 = time.perf_counter()
        shots_csv = OUT_DIR / "shots.csv"
        generator.sample(n=args.shots, random_state=0)[["slices", *PROPERTIES]].to_csv(shots_csv, index=False)
        config = FinetuneConfig(lora=True, lora_rank=8, lora_alpha=16, lr=2e-3, max_steps=args.finetune_steps,
                                batch_size=16, warmup_steps=10, max_length=args.max_len)
        tuned = finetune(base_dir, shots_csv, PROPERTIES, OUT_DIR / "adapter", config)
        results["finetune"] = {k: v for k, v in asdict(tuned).items() if k != "out_dir"}
        results["wall_s"]["finetune"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    judge_model, mean, std, judge_report = train_judge(judge_part, tokenizer, args.judge_budget_s, args.max_len)
    results["judge"] = judge_report
    results["wall_s"]["judge"] = round(time.perf_counter() - t0, 1)
    log(f"judge: {judge_report}")

    torch.manual_seed(0)
    model = load_finetuned(OUT_DIR / "adapter").merge_and_unload().eval()
    base = MatterGPTForCausalLM.from_pretrained(base_dir).eval()
    results["targets"] = {}
    t0 = time.perf_counter()
    reference = judge_part.sample(n=min(args.samples, len(judge_part)), random_state=0)
    report = judge_samples(reference.slices.tolist(), tokenizer, (judge_model, mean, std), args.max_len)
    report["true_median_K_G_gpa"] = [float(reference[p].median()) for p in PROPERTIES]
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    results["targets"]["real strings (judge part)"] = report
    log(f"reference: {report}")
    seen = {" ".join(text.split()) for text in generator.slices}  # memorisation check: verbatim copies
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.grammar]
    for grammar, (name, generator_model, targets) in itertools.product(modes, [
        ("base, unconditioned", base, None),
        *[(f"K={k:g}, G={g:g}", model, dict(zip(PROPERTIES, (k, g)))) for k, g in TARGETS],
    ]):
        name = name if grammar or args.grammar == "off" else f"{name}, no grammar"
        t0 = time.perf_counter()
        texts = sample(generator_model, tokenizer, args.samples, args.max_len, targets, grammar=grammar,
                       temperature=args.temperature)
        report = judge_samples(texts, tokenizer, (judge_model, mean, std), args.max_len)
        report["copied_from_generator_rows_share"] = round(sum(" ".join(t.split()) in seen for t in texts) / len(texts), 3)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        results["targets"][name] = report
        log(f"{name}: {report}")

    results["wall_s"]["total"] = round(time.perf_counter() - started, 1)
    results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    (OUT_DIR / f"{args.results_name}.json").write_text(json.dumps(results, indent=1))
    print(f"{'condition':<39}{'decoded':>9}{'cubic|dec':>11}{'judged':>8}{'med K':>8}{'med G':>8}")
    for name, r in results["targets"].items():
        print(f"{name:<39}{r['decoded_share']:>9}{r['cubic_share_of_decoded']!s:>11}{r['judged']:>8}"
              f"{r['median_predicted_K_gpa']!s:>8}{r['median_predicted_G_gpa']!s:>8}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
