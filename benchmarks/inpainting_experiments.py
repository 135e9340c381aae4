"""The CrystalMLM experiments of Liu et al. (arXiv:2312.14485) on MP-20 rows, small enough for a CPU.

Stages (each a training run through ``training.loop.train`` with the configs in ``training/configs``;
they need the loop's objective hook, see ``training/adversarial.py``):

    prepare      mp_20/train.csv (split train) + mp_20/val.csv (split validation) -> a prepared dataset, and a
                 copy whose train split holds the cubic crystals only (the non-cubic rows become its test split)
    pretrain     masked species + noisy coordinates (crystal_mlm_small.yaml)
    stability    on-hull classifier (e_above_hull == 0) from the pre-trained backbone, cubic crystals only;
                 its accuracy per crystal system on the cubic training rows, mp_20/val and the unseen
                 non-cubic rows, beside a logistic regression on composition + space group trained on the same
                 rows and the constant majority prediction, and a k-fold figure on the cubic rows
    gan          adversarial fine-tuning, critic initialised from the stability classifier
    property     formation-energy regression head, pre-trained backbone vs from scratch (validation MAE)
    evaluate     the stability table (no k-fold); the reconstruction table (mask types α β γ × σ̃)

    python benchmarks/inpainting_experiments.py all --work outputs/inpainting --pretrain-steps 800

Mask types: α masks every orbit of the crystal's element that is most frequent in the training set
(number of training crystals containing it), β its least frequent element, γ 30 % of the orbits at
random; σ̃ is the coordinate noise (× the shortest lattice edge). Metrics of the top-1 completion over
all validation crystals: structural validity (all distances > 0.5 Å), SMACT compositional validity,
composition reconstruction (the completed composition equals the original) and a StructureMatcher
match (pymatgen defaults) to the original structure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _machine import machine_line  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "mp_20"
CONFIGS = ROOT / "training" / "configs"
MASK_TYPES = ("alpha", "beta", "gamma")
NOISE_LEVELS = (0.1, 0.2)


def train_stage(config_name: str, **overrides: Any) -> dict[str, Any]:
    """Run one training config with dotted-key overrides; returns the run's metrics and wall time (s)."""
    from training.loop import TrainConfig, train

    raw = yaml.safe_load((CONFIGS / config_name).read_text())
    for key, value in overrides.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    start = time.perf_counter()
    result = train(TrainConfig.from_dict(raw))
    return {"steps": result.steps, "wall_s": time.perf_counter() - start, **result.metrics}


def prepare(work: Path) -> None:
    """The two prepared datasets (all rows; cubic-only training split)."""
    import pandas as pd

    from training.data import load_split, prepare_dataset, write_shards

    train_rows, val_rows = pd.read_csv(SHARED / "train.csv"), pd.read_csv(SHARED / "val.csv")
    table = pd.concat([train_rows.assign(split="train"), val_rows.assign(split="validation")])
    table = table.drop(columns=[c for c in table.columns if c.startswith("Unnamed")])
    work.mkdir(parents=True, exist_ok=True)
    table.to_csv(work / "mp20_rows.csv", index=False)
    report = prepare_dataset(work / "mp20_rows.csv", work / "data" / "mp20")
    print(f"prepared {report.split_counts}, failures {report.failures_by_type}")
    train_split = load_split(work / "data" / "mp20", "train")
    cubic_dir = work / "data" / "mp20_cubic" / "data"
    write_shards(train_split.filter(lambda r: r["crystal_system"] == "cubic"), cubic_dir, "train", 50_000)
    write_shards(load_split(work / "data" / "mp20", "validation"), cubic_dir, "validation", 50_000)
    write_shards(train_split.filter(lambda r: r["crystal_system"] != "cubic"), cubic_dir, "test", 50_000)


# --------------------------------------------------------------------------------------------------
# Stability classifier
# --------------------------------------------------------------------------------------------------

STABILITY_SPLITS = ("train", "validation", "test")
"""Cubic training rows (the fit), mp_20/val (all systems), the non-cubic mp_20/train rows (unseen systems)."""
MAX_Z = 94
NUM_SPACE_GROUPS = 230


def on_hull(rows: Any) -> np.ndarray:
    """Boolean on-hull label (e_above_hull <= 0 eV/atom) of every row of a prepared split."""
    return np.array([float(p["e_above_hull"]) <= 0.0 for p in rows["properties"]])


@torch.no_grad()
def predict_labels(model_dir: Path, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Predicted class ids of a saved sequence classifier for token texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt")
        out.append(model(**encoded).logits.argmax(dim=-1).numpy())
    return np.concatenate(out)


def per_system_accuracy(truth: np.ndarray, predicted: np.ndarray, systems: np.ndarray) -> dict[str, dict[str, Any]]:
    """Accuracy, row count and on-hull fraction per crystal system and over all rows."""
    report = {}
    for system in [*sorted(set(systems)), "all"]:
        rows = systems == system if system != "all" else np.ones(len(truth), dtype=bool)
        report[system] = {"n": int(rows.sum()), "accuracy": float((predicted == truth)[rows].mean()),
                          "on_hull_fraction": float(truth[rows].mean())}
    return report


def stability_accuracy(model_dir: Path, data_dir: Path) -> dict[str, dict[str, Any]]:
    """On-hull accuracy per crystal system of a saved classifier on every split of :data:`STABILITY_SPLITS`."""
    from training.data import load_split

    report: dict[str, dict[str, Any]] = {}
    for split in STABILITY_SPLITS:
        rows = load_split(data_dir, split)
        predicted = predict_labels(model_dir, list(rows["text"])).astype(bool)
        report[split] = per_system_accuracy(on_hull(rows), predicted, np.array(rows["crystal_system"]))
    return report


def composition_features(rows: Any) -> np.ndarray:
    """Per row: element fractions (Z = 1..94), number of elements, ln(number of sites), one-hot space group."""
    from pymatgen.core import Composition

    features = np.zeros((len(rows), MAX_Z + 2 + NUM_SPACE_GROUPS))
    for i, (formula, sites, group) in enumerate(zip(rows["formula"], rows["num_sites"], rows["space_group"])):
        composition = Composition(formula).fractional_composition
        for element, fraction in composition.items():
            features[i, element.Z - 1] = fraction
        features[i, MAX_Z] = len(composition)
        features[i, MAX_Z + 1] = math.log(sites)
        features[i, MAX_Z + 2 + int(group) - 1] = 1.0
    return features


class LogisticBaseline:
    """L2-regularised logistic regression (full-batch gradient descent) on standardised features.

    The non-neural baseline of the stability experiment; numpy only (scikit-learn is not a dependency).
    Features constant on the training rows (e.g. the space groups of unseen crystal systems) get weight 0.
    """

    def __init__(self, l2: float = 0.01, steps: int = 3000, lr: float = 0.1) -> None:
        self.l2, self.steps, self.lr = l2, steps, lr

    def fit(self, features: np.ndarray, labels: np.ndarray) -> LogisticBaseline:
        self.mean = features.mean(axis=0)
        spread = features.std(axis=0)
        self.scale = np.where(spread > 0, spread, 1.0)
        self.mean = np.where(spread > 0, self.mean, 0.0)
        x = self._design(features)
        y = labels.astype(float)
        self.weights = np.zeros(x.shape[1])
        for _ in range(self.steps):
            p = 1.0 / (1.0 + np.exp(-x @ self.weights))
            gradient = x.T @ (p - y) / len(y)
            gradient[:-1] += self.l2 * self.weights[:-1]
            self.weights -= self.lr * gradient
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self._design(features) @ self.weights > 0.0

    def _design(self, features: np.ndarray) -> np.ndarray:
        scaled = (features - self.mean) / self.scale
        return np.concatenate([scaled, np.ones((len(features), 1))], axis=1)


def baseline_accuracy(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The logistic baseline trained on the same (cubic) training rows, per crystal system of every split."""
    from training.data import load_split

    splits = {split: load_split(data_dir, split) for split in STABILITY_SPLITS}
    model = LogisticBaseline().fit(composition_features(splits["train"]), on_hull(splits["train"]))
    return {split: per_system_accuracy(on_hull(rows), model.predict(composition_features(rows)),
                                       np.array(rows["crystal_system"]))
            for split, rows in splits.items()}


def constant_accuracy(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Always predicting the training rows' majority class, per crystal system of every split."""
    from training.data import load_split

    splits = {split: load_split(data_dir, split) for split in STABILITY_SPLITS}
    majority = bool(on_hull(splits["train"]).mean() >= 0.5)
    return {split: per_system_accuracy(on_hull(rows), np.full(len(rows), majority), np.array(rows["crystal_system"]))
            for split, rows in splits.items()}


def cubic_cross_validation(work: Path, data_dir: Path, folds: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy on cubic rows (the paper's in-distribution figure): k folds of the cubic training rows.

    Each fold trains the classifier (same config and steps as the stability stage) and the logistic
    baseline on the other folds and scores both, and the constant majority prediction, on the held-out fold.
    """
    from training.data import load_split, write_shards

    rows = load_split(data_dir, "train")
    order = np.random.default_rng(seed).permutation(len(rows))
    report: dict[str, Any] = {"folds": folds, "n": len(rows), "classifier": [], "baseline": [], "constant": []}
    for fold in range(folds):
        held = np.zeros(len(rows), dtype=bool)
        held[order[fold::folds]] = True
        fold_dir = work / "stability_cv" / f"fold{fold}"
        write_shards(rows.select(np.flatnonzero(~held).tolist()), fold_dir / "data", "train", 50_000)
        write_shards(rows.select(np.flatnonzero(held).tolist()), fold_dir / "data", "validation", 50_000)
        train_stage("crystal_mlm_stability.yaml", output_dir=str(fold_dir / "run"), **{
            "data.path": str(fold_dir), "model.pretrained": str(work / "pretrain" / "final"),
            "loop.micro_batch_size": 16, "loop.max_steps": steps, "checkpoint.every_steps": steps})
        fit, test = load_split(fold_dir, "train"), load_split(fold_dir, "validation")
        truth = on_hull(test)
        classifier = predict_labels(fold_dir / "run" / "final", list(test["text"])).astype(bool)
        baseline = LogisticBaseline().fit(composition_features(fit), on_hull(fit)).predict(composition_features(test))
        majority = bool(on_hull(fit).mean() >= 0.5)
        report["classifier"].append(float((classifier == truth).mean()))
        report["baseline"].append(float((baseline == truth).mean()))
        report["constant"].append(float((truth == majority).mean()))
    for key in ("classifier", "baseline", "constant"):
        report[f"{key}_mean"] = float(np.mean(report[key]))
    return report


def stability_report(work: Path, data_dir: Path, folds: int, steps: int) -> dict[str, Any]:
    """Classifier, logistic baseline and constant prediction per crystal system, plus the cubic k-fold figure."""
    report: dict[str, Any] = {
        "classifier": stability_accuracy(work / "stability" / "final", data_dir),
        "baseline": baseline_accuracy(data_dir),
        "constant": constant_accuracy(data_dir),
    }
    if folds > 1:
        report["cubic_cv"] = cubic_cross_validation(work, data_dir, folds, steps)
    return report


@torch.no_grad()
def predict_on_hull_probability(model_dir: Path, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """P(on hull) (softmax of class 1) of a saved two-class sequence classifier for token texts."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt")
        out.append(torch.softmax(model(**encoded).logits.float(), dim=-1)[:, 1].numpy())
    return np.concatenate(out)


def roc_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with one class only."""
    from scipy.stats import rankdata

    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def labelled_rows(data_dir: Path, split: str = "train") -> Any:
    """Rows of a prepared split with an e_above_hull label."""
    from training.data import load_split

    rows = load_split(data_dir, split)
    keep = [i for i, p in enumerate(rows["properties"])
            if p.get("e_above_hull") is not None and math.isfinite(float(p["e_above_hull"]))]
    return rows.select(keep)


def all_rows_cross_validation(work: Path, data_dir: Path, pretrained: Path, folds: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Stability on every labelled row (all crystal systems): k folds, classifier vs logistic baseline on the same folds.

    Per crystal system of the pooled held-out predictions: n, on-hull fraction, accuracy and ROC AUC of the
    classifier (from the pre-trained backbone), the logistic regression on composition + space group, and
    the constant majority prediction.
    """
    from training.data import write_shards

    rows = labelled_rows(data_dir)
    order = np.random.default_rng(seed).permutation(len(rows))
    truth = on_hull(rows)
    systems = np.array(rows["crystal_system"])
    scores = {"classifier": np.zeros(len(rows)), "baseline": np.zeros(len(rows)), "constant": np.zeros(len(rows))}
    for fold in range(folds):
        held = np.zeros(len(rows), dtype=bool)
        held[order[fold::folds]] = True
        fold_dir = work / "stability_all" / f"fold{fold}"
        fit, test = rows.select(np.flatnonzero(~held).tolist()), rows.select(np.flatnonzero(held).tolist())
        write_shards(fit, fold_dir / "data", "train", 50_000)
        write_shards(test, fold_dir / "data", "validation", 50_000)
        train_stage("crystal_mlm_stability.yaml", output_dir=str(fold_dir / "run"), **{
            "data.path": str(fold_dir), "model.pretrained": str(pretrained), "loop.micro_batch_size": 32,
            "loop.max_steps": steps, "checkpoint.every_steps": steps, "eval.every_steps": steps})
        scores["classifier"][held] = predict_on_hull_probability(fold_dir / "run" / "final", list(test["text"]))
        logistic = LogisticBaseline().fit(composition_features(fit), on_hull(fit))
        scores["baseline"][held] = logistic._design(composition_features(test)) @ logistic.weights
        scores["constant"][held] = float(on_hull(fit).mean() >= 0.5)
    thresholds = {"classifier": 0.5, "baseline": 0.0, "constant": 0.5}
    report: dict[str, Any] = {"folds": folds, "steps": steps, "n": len(rows), "systems": {}}
    for system in [*sorted(set(systems)), "all"]:
        mask = systems == system if system != "all" else np.ones(len(rows), dtype=bool)
        entry = {"n": int(mask.sum()), "on_hull_fraction": float(truth[mask].mean())}
        for name, score in scores.items():
            predicted = score[mask] >= thresholds[name] if name != "baseline" else score[mask] > 0.0
            entry[f"{name}_accuracy"] = float((predicted == truth[mask]).mean())
            entry[f"{name}_auc"] = roc_auc(truth[mask], score[mask]) if name != "constant" else 0.5
        report["systems"][system] = entry
    return report


def _all_rows_table(report: dict[str, Any]) -> str:
    lines = [f"stability on all {report['n']} labelled rows, {report['folds']}-fold CV (same folds), {report['steps']} steps per fold",
             "| crystal system | n | on hull | constant acc. | classifier acc. | logistic acc. | classifier AUC | logistic AUC | acc. ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for system, e in report["systems"].items():
        lines.append(f"| {system} | {e['n']} | {e['on_hull_fraction']:.3f} | {e['constant_accuracy']:.3f} | "
                     f"{e['classifier_accuracy']:.3f} | {e['baseline_accuracy']:.3f} | {e['classifier_auc']:.3f} | "
                     f"{e['baseline_auc']:.3f} | {_ratio(e['classifier_accuracy'], e['baseline_accuracy'])} |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def _stability_table(report: dict[str, Any]) -> str:
    lines = ["| split | crystal system | n | on hull | constant | classifier | baseline (logistic) | classifier / baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for split, systems in report["classifier"].items():
        for system, row in systems.items():
            baseline = report["baseline"][split][system]["accuracy"]
            constant = report["constant"][split][system]["accuracy"]
            lines.append(f"| {split} | {system} | {row['n']} | {row['on_hull_fraction']:.3f} | {constant:.3f} | "
                         f"{row['accuracy']:.3f} | {baseline:.3f} | {_ratio(row['accuracy'], baseline)} |")
    if "cubic_cv" in report:
        cv = report["cubic_cv"]
        lines.append(f"| cubic {cv['folds']}-fold CV | cubic | {cv['n']} | | {cv['constant_mean']:.3f} | "
                     f"{cv['classifier_mean']:.3f} | {cv['baseline_mean']:.3f} | "
                     f"{_ratio(cv['classifier_mean'], cv['baseline_mean'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reconstruction table
# --------------------------------------------------------------------------------------------------


def mask_requests(texts: list[str], tokenizer: Any, mask_type: str, noise: float, frequency: Counter, seed: int) -> list[Any]:
    """One inpainting request per crystal for mask type α (frequent element), β (rare element) or γ (30 %)."""
    from crystal_tokenizers.wyckoff.masking import EVAL_MASK_FRACTION, element_positions
    from training.inpaint import plan_request

    rng = np.random.default_rng(seed)
    requests = []
    for text in texts:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        elements = sorted({tokens[i] for i in element_positions(tokens)})
        if mask_type == "gamma":
            requests.append(plan_request(text, tokenizer, mask_fraction=EVAL_MASK_FRACTION, noise=noise, rng=rng))
            continue
        chooser = max if mask_type == "alpha" else min
        element = chooser(elements, key=lambda e: (frequency[e], e))
        requests.append(plan_request(text, tokenizer, mask_element=element, noise=noise, rng=rng))
    return requests


def reconstruction_metrics(model_dir: Path, texts: list[str], frequency: Counter, seed: int = 0) -> dict[str, dict[str, float]]:
    """The α/β/γ × σ̃ table of one generator (top-1 completion of every crystal)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from training.evaluate import is_compositionally_valid, is_structurally_valid
    from training.inpaint import inpaint_requests, load_inpainting_model

    model, tokenizer = load_inpainting_model(model_dir)
    originals = [tokenizer.string_to_structure(text) for text in texts]
    matcher = StructureMatcher()
    table: dict[str, dict[str, float]] = {}
    for mask_type in MASK_TYPES:
        for noise in NOISE_LEVELS:
            requests = mask_requests(texts, tokenizer, mask_type, noise, frequency, seed)
            start = time.perf_counter()
            results = inpaint_requests(model, tokenizer, requests, top_k=1, seed=seed)
            seconds = time.perf_counter() - start
            hits = Counter()
            for result, original in zip(results, originals):
                if not result.completions:
                    continue
                structure = result.completions[0].structure
                hits["decoded"] += 1
                hits["structural"] += is_structurally_valid(structure)
                hits["compositional"] += is_compositionally_valid(structure.composition)
                hits["composition"] += structure.composition.almost_equals(original.composition)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hits["match"] += bool(matcher.fit(structure, original))
            n = len(texts)
            table[f"{mask_type} σ̃={noise}"] = {key: hits[key] / n for key in ("decoded", "structural", "compositional", "composition", "match")}
            table[f"{mask_type} σ̃={noise}"]["inpaint_s"] = seconds
    return table


# --------------------------------------------------------------------------------------------------
# Species table: the model (plain, chemistry-aware) against the species baselines, same masks
# --------------------------------------------------------------------------------------------------

VALIDATION_SETS = ("mp_20/val.csv", "mp20_sample/val.csv")
METHODS = ("model", "model + strict chemistry", "model + soft chemistry",
           "model + strict chemistry + co-occurrence prior", "model + soft chemistry + co-occurrence prior",
           "most frequent", "co-occurrence", "SMACT only")
CHEMISTRY_METHODS = METHODS[1:5]
BASELINES = METHODS[5:]
METRICS = ("element_top1", "composition", "compositional", "charge_neutral", "match", "decoded")


def validation_texts(tokenizer: Any, name: str) -> list[str]:
    """Token texts of a shared validation CSV (crystals that fail to encode are left out)."""
    import pandas as pd
    from pymatgen.core import Structure

    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cif in pd.read_csv(SHARED.parent / name)["cif"]:
            try:
                texts.append(tokenizer.structure_to_string(Structure.from_str(cif, fmt="cif")))
            except Exception:  # noqa: BLE001 - an unencodable crystal is skipped and counted by the caller
                continue
    return texts


def species_rankers(stats: Any) -> dict[str, Any]:
    """Every method of :data:`METHODS` as a ranker, from the training element statistics ``stats``; the
    chemistry ones are ``crystal-lm inpaint``'s modes (``--prior-weight 0`` for those without the prior)."""
    from training.chemistry import cooccurrence_baseline, most_frequent_baseline, ranker_for_mode, smact_baseline

    return {"model": ranker_for_mode("none"),
            "model + strict chemistry": ranker_for_mode("strict", stats, prior_weight=0.0),
            "model + soft chemistry": ranker_for_mode("soft", stats, prior_weight=0.0),
            "model + strict chemistry + co-occurrence prior": ranker_for_mode("strict", stats),
            "model + soft chemistry + co-occurrence prior": ranker_for_mode("soft", stats),
            "most frequent": most_frequent_baseline(stats.frequency),
            "co-occurrence": cooccurrence_baseline(stats.frequency, stats.pairs),
            "SMACT only": smact_baseline(stats.frequency)}


def score_results(results: list[Any], originals: list[Any]) -> dict[str, float]:
    """Top-1 metrics: masked-orbit element accuracy, composition, SMACT validity, StructureMatcher, decoded."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from training.chemistry import smact_flags
    from training.evaluate import is_compositionally_valid

    matcher = StructureMatcher()
    hits: Counter = Counter()
    orbits = sum(len(r.masked_orbits) for r in results)
    for result, original in zip(results, originals):
        if not result.completions:
            continue
        best = result.completions[0]
        hits["decoded"] += 1
        hits["element_top1"] += sum(a == b for a, b in zip(best.species, result.original_species))
        hits["compositional"] += is_compositionally_valid(best.structure.composition)
        counts = Counter({str(e): int(round(n)) for e, n in best.structure.composition.items()})
        hits["charge_neutral"] += smact_flags(counts)[0]
        hits["composition"] += best.structure.composition.almost_equals(original.composition)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hits["match"] += bool(matcher.fit(best.structure, original))
    n = len(results)
    return {"element_top1": hits["element_top1"] / max(orbits, 1), "composition": hits["composition"] / n,
            "compositional": hits["compositional"] / n, "charge_neutral": hits["charge_neutral"] / n, "match": hits["match"] / n, "decoded": hits["decoded"] / n,
            "n": n, "masked_orbits": orbits}


def species_table(model_dir: Path, train_texts: list[str], seed: int = 0, methods: Sequence[str] | None = None,
                  noise_levels: Sequence[float] = NOISE_LEVELS) -> dict[str, Any]:
    """Every method on every validation set × mask type × σ̃ (the same masks and noise for all methods).

    Baselines choose species only; their coordinates are the model's denoised ones (the forward pass
    does not depend on the chosen species), so the columns differ only in the species.
    """
    from training.inpaint import inpaint_requests, load_inpainting_model

    model, tokenizer = load_inpainting_model(model_dir)
    stats = tokenizer.fit_training_statistics(train_texts)  # what crystal-lm train saves with the tokenizer
    rankers = {k: v for k, v in species_rankers(stats).items() if methods is None or k in methods}
    frequency = stats.frequency
    table: dict[str, Any] = {}
    for name in VALIDATION_SETS:
        texts = validation_texts(tokenizer, name)
        originals = [tokenizer.string_to_structure(text) for text in texts]
        for mask_type in MASK_TYPES:
            for noise in noise_levels:
                requests = mask_requests(texts, tokenizer, mask_type, noise, frequency, seed)
                for method, ranker in rankers.items():
                    start = time.perf_counter()
                    results = inpaint_requests(model, tokenizer, requests, top_k=1, seed=seed, ranker=ranker)
                    row = score_results(results, originals)
                    row["seconds"] = time.perf_counter() - start
                    table[f"{name} | {mask_type} σ̃={noise} | {method}"] = row
                    print(f"{name} {mask_type} {noise} {method}: " + " ".join(f"{k}={row[k]:.3f}" for k in METRICS), flush=True)
    return table


def _species_markdown(table: dict[str, Any]) -> str:
    lines = ["| validation set | mask, σ̃ | method | top-1 element (masked orbits) | composition | SMACT valid | "
             "charge-neutral (mixed valence allowed) | match |",
             "|---|---|---|---|---|---|---|---|"]
    for key, row in table.items():
        name, setting, method = key.split(" | ")
        lines.append(f"| {name} (n={row['n']}) | {setting} | {method} | {row['element_top1']:.3f} | {row['composition']:.3f} | "
                     f"{row['compositional']:.3f} | {row['charge_neutral']:.3f} | {row['match']:.3f} |")
    return "\n".join(lines)


def _species_verdict(table: dict[str, Any]) -> str:
    """Does each chemistry-aware variant beat every baseline (top-1 element of masked orbits) on every setting?"""
    lines, settings = [], sorted({tuple(k.split(" | ")[:2]) for k in table})
    for variant in ("model", *CHEMISTRY_METHODS):
        wins = 0
        for name, setting in settings:
            chem = table[f"{name} | {setting} | {variant}"]
            best = {m: table[f"{name} | {setting} | {m}"] for m in BASELINES}
            ok = all(chem["element_top1"] > b["element_top1"] for b in best.values())
            wins += ok
            top = max(best, key=lambda m: best[m]["element_top1"])
            lines.append(f"{variant}: {name} {setting}: {chem['element_top1']:.3f} vs best baseline {top} "
                         f"{best[top]['element_top1']:.3f} (ratio {_ratio(chem['element_top1'], best[top]['element_top1'])}), "
                         f"SMACT-valid {chem['compositional']:.3f}, charge-neutral {chem['charge_neutral']:.3f} -> "
                         f"{'beats all' if ok else 'does NOT beat all'}")
        lines.append(f"{variant} beats every baseline (top-1 element) on {wins}/{len(settings)} settings")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Property fine-tuning
# --------------------------------------------------------------------------------------------------


def property_mae(model_dir: Path, data_dir: Path, mean: float, std: float, name: str) -> float:
    """Validation MAE (property units) of a saved regression head trained on standardised targets."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.data import load_split

    rows = load_split(data_dir, "validation")
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    with torch.no_grad():
        encoded = tokenizer(list(rows["text"]), padding=True, return_tensors="pt")
        predicted = model(**encoded).logits[:, 0].numpy() * std + mean
    truth = np.array([float(p[name]) for p in rows["properties"]])
    return float(np.abs(predicted - truth).mean())


def property_experiment(work: Path, steps: int, name: str = "formation_energy_per_atom") -> dict[str, Any]:
    """Regression head from the pre-trained backbone vs from scratch, same steps and data."""
    from training.data import load_split

    data_dir = work / "data" / "mp20"
    values = np.array([float(p[name]) for p in load_split(data_dir, "train")["properties"]])
    mean, std = float(values.mean()), float(values.std())
    task = {"property": name, "type": "regression", "mean": mean, "std": std}
    common = {"data.path": str(data_dir), "task": task, "loop.max_steps": steps, "loop.micro_batch_size": 16,
              "eval.every_steps": steps, "checkpoint.every_steps": steps, "optim.lr": 3e-4}
    report: dict[str, Any] = {"property": name, "train_mean": mean, "train_std": std,
                              "baseline_mae_predict_mean": float(np.abs(
                                  np.array([float(p[name]) for p in load_split(data_dir, "validation")["properties"]]) - mean).mean())}
    pretrained = train_stage("crystal_mlm_stability.yaml", output_dir=str(work / "property_pretrained"),
                             **{"model.pretrained": str(work / "pretrain" / "final"), "model.config": {"num_labels": 1}}, **common)
    scratch_config = yaml.safe_load((CONFIGS / "crystal_mlm_small.yaml").read_text())["model"]["config"]
    scratch = train_stage("crystal_mlm_stability.yaml", output_dir=str(work / "property_scratch"),
                          **{"model.pretrained": None, "model.config": {**scratch_config, "num_labels": 1}}, **common)
    report["pretrained"] = {"mae": property_mae(work / "property_pretrained" / "final", data_dir, mean, std, name), **pretrained}
    report["scratch"] = {"mae": property_mae(work / "property_scratch" / "final", data_dir, mean, std, name), **scratch}
    return report


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _markdown_table(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| mask, σ̃ | model | decoded | struct. valid | SMACT valid | composition acc. | match |",
             "|---|---|---|---|---|---|---|"]
    first = next(iter(tables.values()))
    for setting in first:
        for model_name, table in tables.items():
            row = table[setting]
            lines.append(f"| {setting} | {model_name} | {row['decoded']:.3f} | {row['structural']:.3f} | "
                         f"{row['compositional']:.3f} | {row['composition']:.3f} | {row['match']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("prepare", "pretrain", "stability", "gan", "property", "evaluate", "species", "stability-all", "all"))
    parser.add_argument("--methods", default=None, help="species: comma-separated subset of the methods")
    parser.add_argument("--noise", default=",".join(map(str, NOISE_LEVELS)), help="species: comma-separated σ̃ levels")
    parser.add_argument("--model-dir", type=Path, default=None, help="species: the saved masked model (default: WORK/pretrain/final)")
    parser.add_argument("--train-data", type=Path, default=None,
                        help="species: prepared dataset whose train split gives the element statistics (default: WORK/data/mp20)")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "inpainting")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--stability-steps", type=int, default=300)
    parser.add_argument("--stability-folds", type=int, default=3, help="k of the cubic k-fold figure (0: none)")
    parser.add_argument("--gan-steps", type=int, default=150)
    parser.add_argument("--property-steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line())
    if not SHARED.exists():
        print(f"skipped: {SHARED} is absent (the experiments use the shared MP-20 rows)")
        return 0
    work = args.work
    data, cubic = work / "data" / "mp20", work / "data" / "mp20_cubic"
    small = {"loop.micro_batch_size": 16}
    log: dict[str, Any] = {}
    stages = [args.stage] if args.stage != "all" else ["prepare", "pretrain", "stability", "gan", "property", "evaluate"]
    if "prepare" in stages:
        prepare(work)
    if "pretrain" in stages:
        log["pretrain"] = train_stage("crystal_mlm_small.yaml", output_dir=str(work / "pretrain"), **small, **{
            "data.path": str(data), "loop.max_steps": args.pretrain_steps, "eval.every_steps": args.pretrain_steps,
            "checkpoint.every_steps": args.pretrain_steps})
    if "stability" in stages:
        log["stability"] = train_stage("crystal_mlm_stability.yaml", output_dir=str(work / "stability"), **small, **{
            "data.path": str(cubic), "model.pretrained": str(work / "pretrain" / "final"),
            "loop.max_steps": args.stability_steps})
        log["stability_accuracy"] = stability_report(work, cubic, args.stability_folds, args.stability_steps)
        print(_stability_table(log["stability_accuracy"]))
    if "gan" in stages:
        log["gan"] = train_stage("crystal_mlm_gan.yaml", output_dir=str(work / "gan"), **small, **{
            "data.path": str(data), "model.pretrained": str(work / "pretrain" / "final"),
            "gan.discriminator": str(work / "stability" / "final"), "loop.max_steps": args.gan_steps,
            "eval.every_steps": args.gan_steps, "checkpoint.every_steps": args.gan_steps})
    if "property" in stages:
        log["property"] = property_experiment(work, args.property_steps)
    if "evaluate" in stages:
        from training.data import load_split
        from training.inpaint import load_inpainting_model

        log["stability_accuracy"] = stability_report(work, cubic, folds=0, steps=args.stability_steps)
        _, tokenizer = load_inpainting_model(work / "pretrain" / "final")
        frequency = tokenizer.fit_training_statistics(load_split(data, "train")["text"]).frequency
        texts = list(load_split(data, "validation")["text"])
        tables = {name: reconstruction_metrics(work / name / "final", texts, frequency)
                  for name in ("pretrain", "gan")}
        log["reconstruction"] = tables
        print(f"validation rows: {SHARED / 'val.csv'} ({len(texts)} crystals)")
        print(_markdown_table({"pre-trained": tables["pretrain"], "adversarial": tables["gan"]}))
        print(_stability_table(log["stability_accuracy"]))
    if args.stage == "stability-all":
        log["stability_all"] = all_rows_cross_validation(
            work, args.train_data or data, args.model_dir or work / "pretrain" / "final",
            max(args.stability_folds, 2), args.stability_steps)
        print(_all_rows_table(log["stability_all"]))
    if args.stage == "species":
        from training.data import load_split

        train_texts = list(load_split(args.train_data or data, "train")["text"])
        log["species"] = species_table(args.model_dir or work / "pretrain" / "final", train_texts,
                                       methods=args.methods.split(",") if args.methods else None,
                                       noise_levels=[float(v) for v in args.noise.split(",")])
        print(_species_markdown(log["species"]))
        if not args.methods:
            print(_species_verdict(log["species"]))
    work.mkdir(parents=True, exist_ok=True)
    with open(work / f"experiments_{args.stage}.json", "w") as handle:
        json.dump(log, handle, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    print(json.dumps({k: v for k, v in log.items() if k != "reconstruction"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
