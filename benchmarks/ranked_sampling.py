"""Ranked vs unranked sampling on a formation-energy target (Con-CDVAE's generate-many, keep-the-best).

Setting (small, for shared CPUs): the MatterGPT generator of ``benchmarks/mattergpt_experiments.py
generate`` (dual flow, conditioned on crystal system and Ef, trained on the *generator* part of MP-20
sample + SLICES-PLUS formation-energy strings) samples ``--n`` SLICES-PLUS strings conditioned on the
target Ef (eV/atom). Two MatterGPT regressors are trained here, on disjoint data:

- the *ranker*, on the generator part (what a user has: the generator's own training data);
- the *judge*, on the *predictor* part, which neither the generator nor the ranker saw.

``training.ranking.generate_ranked`` keeps the ``--keep`` candidates the ranker puts closest to the target;
the unranked baseline is the first ``--keep`` candidates of the same stream. ``--candidates`` re-ranks the
streamed ``candidates.csv`` of an earlier run (same candidates, new regressors) instead of sampling. Both are scored by the judge
(mean absolute deviation from the target, eV/atom, on the token strings) and, with ``--decode``, by the
share that decodes to a structure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ranked_sampling.py --n 2000 --keep 200 --target -2.0
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mattergpt_experiments import (
    generation_pool,
    hash_split,
    log,
    predict,
    sample_texts,
    train_predictor,
)

from crystal_tokenizers import CrystalError
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer
from modeling.modeling_mattergpt import MatterGPTForCausalLM
from training.ranking import generate_ranked

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "outputs" / "ranked_sampling"


def regressor(model: torch.nn.Module, tokenizer: SlicesPlusTokenizer, mean: float, std: float, max_len: int):
    """Token strings -> predicted Ef (eV/atom)."""
    def predict_ef(texts) -> np.ndarray:
        return predict(model, tokenizer, list(texts), max_len)[:, 0].numpy() * std + mean
    return predict_ef


def fit_regressor(tokenizer: SlicesPlusTokenizer, part: pd.DataFrame, budget_s: float, max_len: int) -> tuple:
    """Ef regressor on 90 % of ``part``; returns model, mean, std (eV/atom) and MAE on the other 10 %."""
    held_out = part.key.map(lambda k: hash_split("val:" + k, 0.1))
    fit, val = part[~held_out], part[held_out]
    mean, std = float(fit.formation_energy_per_atom.mean()), float(fit.formation_energy_per_atom.std())
    model, _ = train_predictor(tokenizer, fit, mean, std, budget_s, max_len)
    predicted = predict(model, tokenizer, val.text.tolist(), max_len)[:, 0].numpy() * std + mean
    return model, mean, std, float(np.abs(predicted - val.formation_energy_per_atom.to_numpy()).mean())


def decoded_share(texts, tokenizer: SlicesPlusTokenizer) -> float:
    """Share of strings the SLICES-PLUS decoder turns into a structure."""
    ok = 0
    for text in texts:
        try:
            tokenizer.string_to_structure(text)
            ok += 1
        except CrystalError:
            pass
    return round(ok / len(texts), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default=str(ROOT / "outputs" / "mattergpt_experiments" / "generator"))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--keep", type=int, default=200)
    parser.add_argument("--target", type=float, default=-2.0, help="formation energy, eV/atom")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--predictor-fraction", type=float, default=0.35, help="as in mattergpt_experiments")
    parser.add_argument("--ranker-budget-s", type=float, default=360.0, help="ranker training seconds")
    parser.add_argument("--predictor-budget-s", type=float, default=150.0, help="judge training seconds")
    parser.add_argument("--candidates", help="re-rank the candidates.csv of an earlier run instead of sampling")
    parser.add_argument("--decode", action="store_true", help="also decode the kept and baseline strings")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = SlicesPlusTokenizer(decode_time_limit_s=1.0)
    pool = generation_pool(tokenizer, SlicesPlusTokenizer(symmetry=False), args.predictor_fraction)
    generator_part, predictor_part = pool[pool.part == "generator"], pool[pool.part == "predictor"]
    wall = {}

    t0 = time.perf_counter()
    ranker, r_mean, r_std, ranker_mae = fit_regressor(tokenizer, generator_part, args.ranker_budget_s, args.max_len)
    judge, j_mean, j_std, judge_mae = fit_regressor(tokenizer, predictor_part, args.predictor_budget_s, args.max_len)
    wall["regressors"] = round(time.perf_counter() - t0, 1)
    log(f"ranker MAE {ranker_mae:.3f}, judge MAE {judge_mae:.3f} eV/atom (held-out 10 % of their parts)")
    ranker.save_pretrained(OUT_DIR / "ranker")
    judge.save_pretrained(OUT_DIR / "judge")
    rank_ef = regressor(ranker, tokenizer, r_mean, r_std, args.max_len)
    judge_ef = regressor(judge, tokenizer, j_mean, j_std, args.max_len)

    if args.candidates:
        saved = pd.read_csv(args.candidates, keep_default_na=False)
        stream = iter([text if str(ok) == "True" else None for text, ok in zip(saved.text, saved.decoded)])

        def sample_fn(size: int) -> list[str | None]:
            return [next(stream) for _ in range(size)]
    else:
        generator = MatterGPTForCausalLM.from_pretrained(args.generator).eval()
        torch.manual_seed(0)

        def sample_fn(size: int) -> list[str | None]:
            texts = sample_texts(generator, tokenizer, size, args.max_len - 1, formation_energy=args.target,
                                 batch_size=size)
            return [text if text.strip() else None for text in texts]

    t0 = time.perf_counter()
    result = generate_ranked(
        sample_fn, rank_ef, n=args.n, keep=args.keep, target=args.target, batch_size=args.batch_size,
        out_dir=OUT_DIR, progress=lambda it, total: tqdm(it, total=total, desc="batches", file=sys.stderr),
    )
    wall["sample_and_rank"] = round(time.perf_counter() - t0, 1)

    stream = pd.read_csv(OUT_DIR / "candidates.csv", keep_default_na=False)
    decoded_texts = stream[stream.decoded.astype(str) == "True"].text.tolist()
    baseline = decoded_texts[: args.keep]
    ranked = [k.candidate for k in result.kept]
    rows = {}
    for name, texts in (("unranked (first kept-size)", baseline), ("ranked (top kept-size)", ranked),
                        ("all candidates", decoded_texts)):
        judged = judge_ef(texts)
        rows[name] = {
            "n": len(texts),
            "judge_mad_ev_per_atom": round(float(np.mean(np.abs(judged - args.target))), 3),
            "judge_median_ef": round(float(np.median(judged)), 3),
            "ranker_mad_ev_per_atom": round(float(np.mean(np.abs(rank_ef(texts) - args.target))), 3),
        }
        if args.decode and name != "all candidates":
            rows[name]["decoded_share"] = decoded_share(texts, tokenizer)
    results = {
        "target_ef": args.target, "n": args.n, "keep": args.keep, "sampled": result.sampled,
        "token_strings": result.decoded, "scored": result.scored,
        "ranker_val_mae": round(ranker_mae, 3), "judge_val_mae": round(judge_mae, 3),
        "generator": args.generator, "candidates": args.candidates,
        "ranker_prediction_std": round(float(np.std(rank_ef(decoded_texts))), 3), "generator_part": len(generator_part), "predictor_part": len(predictor_part),
        "rows": rows, "wall_s": {**wall, "total": round(time.perf_counter() - started, 1)},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }
    (OUT_DIR / "results.json").write_text(json.dumps(results, indent=1))
    print(f"target Ef {args.target} eV/atom; {result.sampled} sampled -> {args.keep} kept")
    print(f"{'set':<30}{'n':>6}{'judge MAD':>11}{'judge med':>11}{'ranker MAD':>12}")
    for name, r in rows.items():
        print(f"{name:<30}{r['n']:>6}{r['judge_mad_ev_per_atom']:>11}{r['judge_median_ef']:>11}"
              f"{r['ranker_mad_ev_per_atom']:>12}")
    ratio = rows["ranked (top kept-size)"]["judge_mad_ev_per_atom"] / rows["unranked (first kept-size)"]["judge_mad_ev_per_atom"]
    print(f"ranked / unranked judge MAD: {ratio:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
