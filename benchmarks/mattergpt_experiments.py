"""Small-scale SLICES-PLUS experiments with MatterGPT (issue 7 acceptance runs).

``classify``: the paper's Experiment 1 at small scale. The MP-20 sample (``../shared/data/mp20_sample``,
crystal-system labels from spglib at symprec 0.1) is encoded as SLICES-PLUS and as plain SLICES; a
``MatterGPTForSequenceClassification`` is trained for a fixed wall-clock budget on each and per-class
validation accuracy is printed. A plain-SLICES classifier is also trained on the paper's 3-class
strings (``slices_plus_paper/crystal_system.csv``) with a hash split (see ``hash_split``).

``generate``: a dual-flow ``MatterGPTForCausalLM`` conditioned on crystal system and formation energy
(eV/atom) is trained on the generator part of (MP-20 sample + ``slices_plus_paper/formation_energy.csv``);
a formation-energy regressor is trained on the disjoint predictor part. Then 100 samples per crystal
system and 100 per formation-energy target are drawn, decoded with the SLICES-PLUS decoder and judged
(spglib crystal system at symprec 0.1; regressor on the re-encoded decoded structure). Sampling goes
through the SLICES grammar ``LogitsProcessor`` unless ``--no-grammar`` is given.

Both use a minimal AdamW loop (warm-up then constant learning rate, wall-clock budget) in this file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mattergpt_experiments.py classify --budget-s 240
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mattergpt_experiments.py generate --budget-s 1800
"""

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import spglib
import torch
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystal_tokenizers import CRYSTAL_SYSTEMS, CrystalError, crystal_system
from crystal_tokenizers.slices.grammar import SYMMETRY_CHECKS
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer
from modeling.configuration_mattergpt import MatterGPTConfig
from modeling.modeling_mattergpt import MatterGPTForCausalLM, MatterGPTForSequenceClassification

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT_DIR = Path(__file__).resolve().parents[1] / "outputs" / "mattergpt_experiments"
JUDGE_SYMPREC = 0.1
"""spglib tolerance (Å) for crystal-system labels and for judging generated crystals (house convention)."""
MODEL_SIZE = {"n_layer": 3, "n_head": 4, "n_embd": 128, "n_inner": 512}
"""Blocks per flow, heads, width, feed-forward width: far below the paper's 8/8/512/2048, to fit shared CPUs."""


def log(message: str) -> None:
    """Progress on stderr (this is a script)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def hash_split(key: str, fraction: float) -> bool:
    """True for about ``fraction`` of keys, decided by the first 8 hex digits of the key's SHA-256."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def spglib_crystal_system(structure: Structure, symprec: float = JUDGE_SYMPREC) -> int | None:
    """Crystal system 0-6 (0 cubic … 6 triclinic) from spglib, ``None`` when spglib fails."""
    try:
        number = SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()
    except (ValueError, TypeError, RuntimeError):
        return None
    return CRYSTAL_SYSTEMS.index(crystal_system(number))


# --------------------------------------------------------------------------------------------- data


def encode_mp20(tokenizer: SlicesPlusTokenizer, plain: SlicesPlusTokenizer, out_dir: Path = OUT_DIR) -> pd.DataFrame:
    """MP-20 sample rows with crystal system (spglib 0.1), SLICES-PLUS and plain SLICES text; cached as CSV."""
    cache = out_dir / "mp20_encoded.csv"
    if not cache.exists():
        _write_mp20_encoding(tokenizer, plain, cache)
    return pd.read_csv(cache, keep_default_na=False)


def _write_mp20_encoding(tokenizer: SlicesPlusTokenizer, plain: SlicesPlusTokenizer, cache: Path) -> None:
    rows = []
    for split in ("train", "val"):
        table = pd.read_csv(SHARED_DATA / "mp20_sample" / f"{split}.csv")
        for index, row in enumerate(table.to_dict("records")):
            structure = Structure.from_str(row["cif"], fmt="cif")
            record = {
                "material_id": row["material_id"],
                "split": split,
                "formation_energy_per_atom": row["formation_energy_per_atom"],
                "crystal_system": spglib_crystal_system(structure),
                "mp_crystal_system": CRYSTAL_SYSTEMS.index(crystal_system(int(row["spacegroup.number"]))),
            }
            for column, codec in (("slices_plus", tokenizer), ("slices", plain)):
                try:
                    record[column] = codec.structure_to_string(structure)
                    record[f"{column}_error"] = ""
                except CrystalError as error:
                    record[column] = ""
                    record[f"{column}_error"] = type(error).__name__
            rows.append(record)
            if index % 200 == 0:
                log(f"encoded {split} {index}/{len(table)}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(cache, index=False)


def token_ids(tokenizer: SlicesPlusTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text framed by BOS ... EOS."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *seq, tokenizer.eos_token_id] for seq in ids]


def length_batches(lengths: Sequence[int], max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length, each at most ``max_tokens`` padded tokens, in shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------- training


@dataclass
class TrainStats:
    """What one budgeted training run did."""

    steps: int
    epochs: float
    tokens: int
    wall_s: float
    final_loss: float


def train_budgeted(
    model: torch.nn.Module,
    lengths: Sequence[int],
    step_loss: Callable[[list[int]], torch.Tensor],
    budget_s: float,
    max_tokens: int,
    lr: float = 5e-4,
    warmup_steps: int = 20,
    seed: int = 0,
    schedule: str = "constant",
    checkpoint: Callable[[], None] | None = None,
    checkpoint_every_s: float = 600.0,
) -> TrainStats:
    """AdamW (paper lr 5e-4) over length batches until ``budget_s`` seconds pass: linear warm-up, then
    ``schedule`` "constant" or "cosine" (cosine decay to zero over the wall-clock budget).
    ``checkpoint()`` is called every ``checkpoint_every_s`` seconds (a long run survives an interruption)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start, steps, tokens, epochs, recent = time.perf_counter(), 0, 0, 0.0, []
    last_checkpoint = start
    while time.perf_counter() - start < budget_s:
        batches = length_batches(lengths, max_tokens, rng)
        for done, batch in enumerate(batches, 1):
            elapsed = min(1.0, (time.perf_counter() - start) / budget_s)
            decay = 0.5 * (1.0 + math.cos(math.pi * elapsed)) if schedule == "cosine" else 1.0
            for group in optimiser.param_groups:
                group["lr"] = lr * min(1.0, (steps + 1) / warmup_steps) * decay
            loss = step_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            steps += 1
            tokens += sum(lengths[i] for i in batch)
            recent = (recent + [loss.item()])[-20:]
            if steps % 50 == 0:
                log(f"step {steps} epoch {epochs + done / len(batches):.2f} loss {statistics.mean(recent):.4f}")
            if checkpoint is not None and time.perf_counter() - last_checkpoint >= checkpoint_every_s:
                model.eval()
                checkpoint()
                model.train()
                last_checkpoint = time.perf_counter()
            if time.perf_counter() - start >= budget_s:
                epochs += done / len(batches)
                break
        else:
            epochs += 1.0
    model.eval()
    return TrainStats(steps, round(epochs, 2), tokens, round(time.perf_counter() - start, 1), statistics.mean(recent))


def small_config(tokenizer: SlicesPlusTokenizer, n_positions: int, **overrides) -> MatterGPTConfig:
    """The experiments' model size (CPU-sized, see ``MODEL_SIZE``), paper dropouts (0.1)."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        **MODEL_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kwargs.update(overrides)
    return MatterGPTConfig(**kwargs)


# ----------------------------------------------------------------------------------- experiment 1


def train_classifier(
    tokenizer: SlicesPlusTokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    num_labels: int,
    budget_s: float,
    max_len: int,
) -> tuple[MatterGPTForSequenceClassification, TrainStats]:
    """Single-flow MatterGPT classifier on ``texts`` (left-truncated to ``max_len`` tokens: the symmetry part is at the end)."""
    ids = [seq[-max_len:] for seq in token_ids(tokenizer, texts)]
    config = small_config(tokenizer, max_len, dual_flow=False, num_labels=num_labels, condition_dropout=0.0)
    torch.manual_seed(0)
    model = MatterGPTForSequenceClassification(config)
    targets = torch.tensor(labels, dtype=torch.long)

    def step_loss(batch: list[int]) -> torch.Tensor:
        batch_ids, mask = pad([ids[i] for i in batch], tokenizer.pad_token_id)
        return model(batch_ids, attention_mask=mask, labels=targets[batch]).loss

    stats = train_budgeted(model, [len(s) for s in ids], step_loss, budget_s, max_tokens=4096)
    return model, stats


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer: SlicesPlusTokenizer, texts: Sequence[str], max_len: int) -> torch.Tensor:
    """Pooled logits (N, num_labels) in batches of similar length."""
    ids = [seq[-max_len:] for seq in token_ids(tokenizer, texts)]
    out = torch.empty(len(ids), model.config.num_labels)
    for batch in length_batches([len(s) for s in ids], 8192, random.Random(0)):
        batch_ids, mask = pad([ids[i] for i in batch], tokenizer.pad_token_id)
        out[batch] = model(batch_ids, attention_mask=mask).logits
    return out


def per_class_report(predicted: Sequence[int], true: Sequence[int], num_labels: int) -> dict:
    """Overall and per-class accuracy and the confusion matrix (rows true, columns predicted)."""
    confusion = np.zeros((num_labels, num_labels), dtype=int)
    for p, t in zip(predicted, true):
        confusion[t, p] += 1
    per_class = {
        CRYSTAL_SYSTEMS[c]: (round(float(confusion[c, c] / confusion[c].sum()), 3) if confusion[c].sum() else None)
        for c in range(num_labels)
    }
    support = {CRYSTAL_SYSTEMS[c]: int(confusion[c].sum()) for c in range(num_labels)}
    accuracy = float(np.trace(confusion) / confusion.sum())
    return {"accuracy": round(accuracy, 3), "per_class": per_class, "support": support, "confusion": confusion.tolist()}


def run_classification(
    name: str, tokenizer: SlicesPlusTokenizer, train: pd.DataFrame, val: pd.DataFrame, column: str,
    num_labels: int, budget_s: float, max_len: int,
) -> dict:
    """Train on ``train[column]`` -> ``crystal_system``, report on ``val``."""
    log(f"{name}: {len(train)} train / {len(val)} val strings")
    model, stats = train_classifier(
        tokenizer, train[column].tolist(), train["crystal_system"].tolist(), num_labels, budget_s, max_len
    )
    predicted = predict(model, tokenizer, val[column].tolist(), max_len).argmax(-1).tolist()
    report = per_class_report(predicted, val["crystal_system"].tolist(), num_labels)
    lengths = [len(s) for s in token_ids(tokenizer, train[column].tolist())]
    return {"name": name, "train": len(train), "val": len(val), "max_len": max_len,
            "median_tokens": int(np.median(lengths)), "max_tokens": int(max(lengths)),
            "truncated": int(sum(n > max_len for n in lengths)), **asdict(stats), **report}


def classify(args: argparse.Namespace) -> dict:
    """Experiment 1: SLICES-PLUS vs plain SLICES crystal-system classification, plus the paper's 3-class set."""
    tokenizer, plain = SlicesPlusTokenizer(), SlicesPlusTokenizer(symmetry=False)
    mp20 = encode_mp20(tokenizer, plain)
    usable = mp20[(mp20.slices_plus != "") & (mp20.slices != "") & (mp20.crystal_system != "")].copy()
    usable["crystal_system"] = usable["crystal_system"].astype(int)
    results = {
        "mp20_rows": len(mp20),
        "mp20_encoded": len(usable),
        "encode_failures": {
            column: mp20.loc[mp20[f"{column}_error"] != "", f"{column}_error"].value_counts().to_dict()
            for column in ("slices_plus", "slices")
        },
        "label_agreement_with_mp_spacegroup": round(float((usable.crystal_system == usable.mp_crystal_system.astype(int)).mean()), 3),
        "runs": [],
    }
    train, val = usable[usable.split == "train"], usable[usable.split == "val"]
    for column, name in (("slices_plus", "MP-20 sample, SLICES-PLUS"), ("slices", "MP-20 sample, plain SLICES")):
        results["runs"].append(
            run_classification(name, tokenizer, train, val, column, 7, args.budget_s, args.max_len)
        )
    paper = pd.read_csv(SHARED_DATA / "slices_plus_paper" / "crystal_system.csv")
    in_val = paper["slices"].map(lambda text: hash_split(text, 0.2))
    results["paper_split"] = "val = rows whose SHA-256(slices)[:8]/16^8 < 0.2, train = the rest"
    results["runs"].append(
        run_classification("paper 3-class, plain SLICES", tokenizer, paper[~in_val], paper[in_val], "slices", 3,
                           args.budget_s, args.max_len)
    )
    return results


# ----------------------------------------------------------------------------------- experiment 2


def generation_pool(
    tokenizer: SlicesPlusTokenizer, plain: SlicesPlusTokenizer, predictor_fraction: float, out_dir: Path = OUT_DIR
) -> pd.DataFrame:
    """MP-20 sample + paper formation-energy strings: text, crystal system, Ef (eV/atom), and the part each is in."""
    mp20 = encode_mp20(tokenizer, plain, out_dir)
    mp20 = mp20[(mp20.slices_plus != "") & (mp20.crystal_system != "")]
    paper = pd.read_csv(SHARED_DATA / "slices_plus_paper" / "formation_energy.csv")
    pool = pd.concat(
        [
            pd.DataFrame({"key": mp20.material_id, "text": mp20.slices_plus, "source": "mp20_sample",
                          "crystal_system": mp20.crystal_system.astype(int),
                          "formation_energy_per_atom": mp20.formation_energy_per_atom.astype(float)}),
            pd.DataFrame({"key": paper.slices_plus, "text": paper.slices_plus, "source": "slices_plus_paper",
                          "crystal_system": paper.crystal_system,
                          "formation_energy_per_atom": paper.formation_energy_per_atom}),
        ],
        ignore_index=True,
    )
    pool["part"] = ["predictor" if hash_split("part:" + k, predictor_fraction) else "generator" for k in pool.key]
    return pool


def train_generator(
    tokenizer: SlicesPlusTokenizer, pool: pd.DataFrame, budget_s: float, max_len: int, lr: float,
    schedule: str = "constant", init_from: Path | None = None, save_to: Path | None = None,
) -> tuple[MatterGPTForCausalLM, TrainStats, int]:
    """Dual-flow generator on strings of at most ``max_len`` tokens, conditioned on crystal system and Ef.

    Dropout is off (a run of a few epochs under-fits); condition dropout stays at its default 0.1.
    ``init_from``: continue training a saved generator (same pool, so the same Ef normalisation) instead
    of starting from random weights. ``save_to``: the generator is saved there (with the tokenizer, so the
    folder loads with the Auto classes and ``crystal-lm generate``) every 10 minutes of training.
    """
    tokenizer.fit_training_statistics(pool.text.tolist())  # the coordination table, saved with the generator
    ids = token_ids(tokenizer, pool.text.tolist())
    keep = [i for i, seq in enumerate(ids) if len(seq) <= max_len]
    ids = [ids[i] for i in keep]
    energy = torch.tensor(pool.formation_energy_per_atom.to_numpy()[keep], dtype=torch.float32).unsqueeze(-1)
    systems = torch.tensor(pool.crystal_system.to_numpy()[keep], dtype=torch.long)
    config = small_config(
        tokenizer, max_len, dual_flow=True, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
        property_names=("formation_energy_per_atom",),
        property_means=(float(energy.mean()),), property_stds=(float(energy.std()),),
    )
    torch.manual_seed(0)
    model = MatterGPTForCausalLM.from_pretrained(init_from) if init_from else MatterGPTForCausalLM(config)

    def step_loss(batch: list[int]) -> torch.Tensor:
        batch_ids, mask = pad([ids[i] for i in batch], tokenizer.pad_token_id)
        labels = batch_ids.masked_fill(mask == 0, -100)
        return model(batch_ids, attention_mask=mask, labels=labels, crystal_system=systems[batch],
                     properties=energy[batch]).loss

    def checkpoint() -> None:
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)

    stats = train_budgeted(model, [len(s) for s in ids], step_loss, budget_s, max_tokens=6144, lr=lr,
                           schedule=schedule, checkpoint=checkpoint if save_to is not None else None)
    if save_to is not None:
        checkpoint()
    return model, stats, len(pool) - len(keep)


def predictor_split(pool: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, float, float]:
    """Predictor-part train/val rows (val: 10 % by key hash) and the Ef scaling (mean, std in eV/atom) of train."""
    held_out = pool.key.map(lambda k: hash_split("val:" + k, 0.1))
    train, val = pool[~held_out], pool[held_out]
    return train, val, float(train.formation_energy_per_atom.mean()), float(train.formation_energy_per_atom.std())


def train_predictor(
    tokenizer: SlicesPlusTokenizer, train: pd.DataFrame, mean: float, std: float, budget_s: float, max_len: int
) -> tuple[MatterGPTForSequenceClassification, TrainStats]:
    """Single-flow Ef regressor trained on the standardised target ``(Ef - mean) / std``."""
    ids = [seq[-max_len:] for seq in token_ids(tokenizer, train.text.tolist())]
    targets = torch.tensor(((train.formation_energy_per_atom - mean) / std).to_numpy(), dtype=torch.float32)
    config = small_config(tokenizer, max_len, dual_flow=False, num_labels=1, problem_type="regression",
                          condition_dropout=0.0)
    torch.manual_seed(0)
    model = MatterGPTForSequenceClassification(config)

    def step_loss(batch: list[int]) -> torch.Tensor:
        batch_ids, mask = pad([ids[i] for i in batch], tokenizer.pad_token_id)
        return model(batch_ids, attention_mask=mask, labels=targets[batch]).loss

    return model, train_budgeted(model, [len(s) for s in ids], step_loss, budget_s, max_tokens=4096)


@torch.no_grad()
def sample_texts(
    model: MatterGPTForCausalLM, tokenizer: SlicesPlusTokenizer, n: int, max_new_tokens: int,
    crystal_system: int | None = None, formation_energy: float | None = None, temperature: float = 1.0,
    top_k: int = 50, batch_size: int = 50, grammar: bool = True, symmetry_check: str = "graph",
) -> list[str]:
    """``n`` sampled strings under the given conditions (``None`` = unconditioned).

    ``grammar`` masks, at every step, the tokens after which no parsable string with a connected
    3-periodic graph could follow (``tokenizer.grammar_processor``, canonical order as the encoder writes);
    ``symmetry_check`` is the processor's (``"graph"``: the operations form a point group of graph automorphisms).
    A sequence holding ``<unk>``/``<mask>`` is returned as ``""`` (it cannot decode).
    """
    texts = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        kwargs = {}
        if crystal_system is not None:
            kwargs["crystal_system"] = torch.full((size,), crystal_system)
        if formation_energy is not None:
            kwargs["properties"] = torch.full((size, 1), formation_energy)
        if grammar:
            kwargs["logits_processor"] = [tokenizer.grammar_processor(max_length=1 + max_new_tokens,
                                                                      symmetry_check=symmetry_check)]
        out = model.generate(
            torch.full((size, 1), tokenizer.bos_token_id), attention_mask=torch.ones(size, 1, dtype=torch.long),
            do_sample=True, temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
        )
        texts += [_text_or_empty(tokenizer, ids) for ids in out.tolist()]
    return texts


def _text_or_empty(tokenizer: SlicesPlusTokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.ids_to_text(ids)
    except CrystalError:
        return ""


POINT_GROUP_SYSTEMS = (6, 6, 5, 5, 5, 4, 4, 4, *[3] * 7, *[2] * 5, *[1] * 7, *[0] * 5)
"""Crystal system (index into CRYSTAL_SYSTEMS) of each of spglib's point groups 1-32."""


def written_symmetry(text: str, tokenizer: SlicesPlusTokenizer) -> tuple[int | None, int]:
    """Crystal system of the point group of the rotations a string writes (spglib; None if they form
    none) and the number of operations written."""
    try:
        symops = tokenizer.string_to_record(text).symops
    except CrystalError:
        return None, 0
    rotations = np.array([op.matrices()[0] for op in symops])
    try:
        number = spglib.get_pointgroup(rotations)[1] if len(rotations) else 0
    except (TypeError, ValueError):
        number = 0
    return (POINT_GROUP_SYSTEMS[number - 1] if number else None), len(symops)


@torch.no_grad()
def operations_nll(model: MatterGPTForCausalLM, tokenizer: SlicesPlusTokenizer, rows: pd.DataFrame) -> dict:
    """Mean NLL (nats per string) of the symmetry-operation tokens of ``rows`` under their own crystal
    system and under each other one (formation energy given): how strongly the crystal-system condition
    shapes the written operations, on strings the generator never saw."""
    true_nll, other_nll = [], []
    for text, system, energy in zip(rows.text, rows.crystal_system, rows.formation_energy_per_atom):
        ids = torch.tensor(token_ids(tokenizer, [text]))
        n_ops = 6 * len(tokenizer.string_to_record(text).symops)
        if not n_ops or ids.shape[1] > model.config.n_positions:
            continue
        systems = torch.arange(len(CRYSTAL_SYSTEMS))
        logits = model(ids.expand(len(systems), -1), crystal_system=systems,
                       properties=torch.full((len(systems), 1), float(energy))).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].expand(len(systems), -1),
                                                reduction="none")[:, -1 - n_ops:-1].sum(-1)
        true_nll.append(float(nll[system]))
        other_nll.append(float(torch.cat([nll[:system], nll[system + 1:]]).mean()))
    return {"strings": len(true_nll), "true_crystal_system": round(statistics.mean(true_nll), 2),
            "other_crystal_systems": round(statistics.mean(other_nll), 2)}


def judge(texts: Sequence[str], tokenizer: SlicesPlusTokenizer) -> list[dict]:
    """Decode each string (SLICES-PLUS decoder); crystal system by spglib (symprec 0.1); re-encoded text;
    crystal system of the written operations and their number."""
    records = []
    for text in texts:
        written_system, operations = written_symmetry(text, tokenizer)
        record = {"decoded": False, "crystal_system": None, "reencoded": None, "error": None,
                  "written_system": written_system, "operations": operations}
        try:
            structure = tokenizer.string_to_structure(text)
            record["decoded"] = True
            record["crystal_system"] = spglib_crystal_system(structure)
            record["reencoded"] = tokenizer.structure_to_string(structure)
        except CrystalError as error:
            record["error"] = type(error).__name__
        records.append(record)
    return records


def generate(args: argparse.Namespace) -> dict:
    """Experiment 2: conditional generation (crystal system, formation energy) and its judged outcome."""
    tokenizer = SlicesPlusTokenizer(decode_time_limit_s=args.decode_time_limit_s)
    plain = SlicesPlusTokenizer(symmetry=False)
    out_dir = args.out_dir
    pool = generation_pool(tokenizer, plain, args.predictor_fraction, out_dir)
    generator_part, predictor_part = pool[pool.part == "generator"], pool[pool.part == "predictor"]
    log(f"pool {len(pool)}: generator {len(generator_part)}, predictor {len(predictor_part)}")
    predictor_train, predictor_val, mean, std = predictor_split(predictor_part)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "grammar": args.grammar,
                "symmetry_check": args.symmetry_check}
    results = {"pool": len(pool), "generator_strings": len(generator_part), "predictor_strings": len(predictor_part),
               "max_len": args.max_len, "sampling": sampling}
    if args.reuse:
        generator = MatterGPTForCausalLM.from_pretrained(out_dir / "generator").eval()
        predictor = MatterGPTForSequenceClassification.from_pretrained(out_dir / "predictor").eval()
        results["models"] = f"reused from {out_dir}"
    else:
        generator, gen_stats, dropped = train_generator(tokenizer, generator_part, args.budget_s, args.max_len, args.lr,
                                                        args.schedule, args.init_from, save_to=out_dir / "generator")
        predictor, pred_stats = train_predictor(tokenizer, predictor_train, mean, std, args.predictor_budget_s,
                                                args.max_len)
        predictor.save_pretrained(out_dir / "predictor")
        tokenizer.save_pretrained(out_dir / "predictor")
        results.update({"generator_dropped_longer_than_max_len": dropped, "generator_lr": args.lr,
                        "generator_schedule": args.schedule,
                        "generator_init_from": str(args.init_from) if args.init_from else None,
                        "generator_training": asdict(gen_stats), "predictor_training": asdict(pred_stats)})
        if args.train_only:
            return results
    predicted_val = predict(predictor, tokenizer, predictor_val.text.tolist(), args.max_len)[:, 0] * std + mean
    results["predictor_val_mae_ev_per_atom"] = round(
        float((predicted_val - torch.tensor(predictor_val.formation_energy_per_atom.to_numpy())).abs().mean()), 3
    )
    results["generator_part_median_ef"] = round(float(generator_part.formation_energy_per_atom.median()), 3)
    results["operations_nll_unseen_strings"] = operations_nll(generator, tokenizer, predictor_val)
    log(f"operations NLL on unseen strings: {results['operations_nll_unseen_strings']}")
    results["crystal_system_targets"], results["formation_energy_targets"] = {}, {}

    def predicted_ef(texts: Sequence[str]) -> list[float]:
        return (predict(predictor, tokenizer, texts, args.max_len)[:, 0] * std + mean).tolist() if texts else []

    for system in range(len(CRYSTAL_SYSTEMS)):
        start = time.perf_counter()
        texts = sample_texts(generator, tokenizer, args.samples, args.max_len - 1, crystal_system=system, **sampling)
        records = judge(texts, tokenizer)
        decoded = [r for r in records if r["decoded"]]
        results["crystal_system_targets"][CRYSTAL_SYSTEMS[system]] = {
            "decoded_share": len(decoded) / len(records),
            "target_hit_share": sum(r["crystal_system"] == system for r in records) / len(records),
            "target_hit_share_of_decoded": (sum(r["crystal_system"] == system for r in decoded) / len(decoded)
                                            if decoded else None),
            "written_system_hit_share": sum(r["written_system"] == system for r in records) / len(records),
            "written_systems": pd.Series([CRYSTAL_SYSTEMS[r["written_system"]] for r in records
                                          if r["written_system"] is not None], dtype=object).value_counts().to_dict(),
            "median_operations": int(np.median([r["operations"] for r in records])),
            "errors": pd.Series([r["error"] for r in records if r["error"]], dtype=object).value_counts().to_dict(),
            "median_tokens": int(np.median([len(t.split()) for t in texts])),
            "wall_s": round(time.perf_counter() - start, 1),
        }
        log(f"{CRYSTAL_SYSTEMS[system]}: {results['crystal_system_targets'][CRYSTAL_SYSTEMS[system]]}")
    for target in args.ef_targets:
        texts = sample_texts(generator, tokenizer, args.samples, args.max_len - 1, formation_energy=target, **sampling)
        records = judge(texts, tokenizer)
        judged = predicted_ef([r["reencoded"] for r in records if r["reencoded"]])
        raw = predicted_ef([t for t in texts if t.strip()])
        results["formation_energy_targets"][str(target)] = {
            "decoded_share": sum(r["decoded"] for r in records) / len(records),
            "median_predicted_ef_decoded": round(statistics.median(judged), 3) if judged else None,
            "n_decoded_reencoded": len(judged),
            "median_predicted_ef_all_strings": round(statistics.median(raw), 3) if raw else None,
        }
        log(f"Ef target {target}: {results['formation_energy_targets'][str(target)]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cls = sub.add_parser("classify", help="Experiment 1")
    cls.add_argument("--budget-s", type=float, default=300.0, help="training wall-clock seconds per classifier")
    cls.add_argument("--max-len", type=int, default=1024, help="tokens kept per string (from the end)")
    gen = sub.add_parser("generate", help="Experiment 2")
    gen.add_argument("--budget-s", type=float, default=1800.0, help="generator training wall-clock seconds")
    gen.add_argument("--lr", type=float, default=1e-3, help="generator peak learning rate (paper: 5e-4)")
    gen.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                     help="generator learning rate after warm-up (cosine: decays to zero over --budget-s)")
    gen.add_argument("--init-from", type=Path, help="continue training this saved generator")
    gen.add_argument("--predictor-budget-s", type=float, default=240.0)
    gen.add_argument("--predictor-fraction", type=float, default=0.35)
    gen.add_argument("--max-len", type=int, default=768)
    gen.add_argument("--samples", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--reuse", action="store_true", help="load the saved generator and predictor, only sample")
    gen.add_argument("--out-dir", type=Path, default=OUT_DIR,
                     help="folder for the encoding cache, the generator/ and predictor/ folders and the results")
    gen.add_argument("--train-only", action="store_true", help="stop after training and saving the two models")
    gen.add_argument("--run-name", default="generate", help="name of the results JSON")
    gen.add_argument("--decode-time-limit-s", type=float, default=2.0, help="decoder time box per string")
    gen.add_argument("--ef-targets", type=float, nargs="+", default=[-0.5, -2.5], help="eV/atom")
    gen.add_argument("--no-grammar", dest="grammar", action="store_false",
                     help="sample without the SLICES grammar LogitsProcessor (the earlier runs)")
    gen.add_argument("--symmetry-check", choices=SYMMETRY_CHECKS, default="graph",
                     help="grammar check of the symmetry part (none: per operation; group: closed point group; "
                          "graph: point group of automorphisms of the sampled graph)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = classify(args) if args.command == "classify" else generate(args)
    results["wall_s_total"] = round(time.perf_counter() - started, 1)
    results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    out_dir = getattr(args, "out_dir", OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{getattr(args, 'run_name', args.command)}.json"
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
