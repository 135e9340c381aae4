"""Fine-tune a saved MatterGPT on property conditions it was not trained with (PEFT LoRA or full).

The SLICES-PLUS paper fine-tunes a pre-trained MatterGPT on a few thousand cubic crystals to target bulk
and shear moduli (K, G in GPa). Here:

1. :func:`extend_conditions` builds the base model with the new property names appended to its own
   (``config.property_names``), their normalisation statistics (mean, std in data units, computed from
   the fine-tuning rows) stored in ``config.property_means`` / ``property_stds``. Every base weight is
   copied; the property-embedding rows of the new properties are freshly initialised.
2. With ``lora=True`` the attention and MLP linears (:data:`LORA_TARGET_MODULES`) get LoRA adapters and
   the property embedding (:data:`CONDITION_MODULES`) is trained in full as a PEFT ``modules_to_save``;
   everything else stays frozen. With ``lora=False`` every weight trains.
3. Training runs in the generic loop (:func:`training.loop.train`). The loop filters batch keys by the
   explicit arguments of ``model.forward``; ``PeftModel.forward`` takes ``**kwargs`` and would lose the
   condition tensors, so the loop is given the LoRA-injected inner model (``peft_model.get_base_model()``,
   the same modules and parameters) and the adapter is saved from the ``PeftModel`` afterwards.

Loading a LoRA fine-tune (``out_dir`` holds ``adapter_config.json``, ``adapter_model.safetensors`` with the
LoRA weights and the whole property embedding, ``config.json`` with the extended conditions, and the
tokenizer)::

    config = AutoConfig.from_pretrained(out_dir, trust_remote_code=True)
    base = extend_conditions(AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True),
                             config.property_names, config.property_means, config.property_stds)
    model = PeftModel.from_pretrained(base, out_dir)     # or: load_finetuned(out_dir)

A full fine-tune is an ordinary checkpoint: ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

from crystal_tokenizers.errors import CrystalEncodeError
from crystal_tokenizers.loading import load_tokenizer
from training.data import TEXT_COLUMN, write_shards
from training.conditions import condition_tensors  # noqa: F401 - re-exported (moved)
from training.io import parse_cif
from training.loop import FINAL_DIR, TrainConfig, train

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
"""MatterGPT linears that get LoRA adapters: attention QKV and output projections, MLP in and out."""
CONDITION_MODULES: tuple[str, ...] = ("property_embedding",)
"""Modules trained in full and saved with the adapter (PEFT ``modules_to_save``): the new conditions live here."""
TEXT_COLUMNS: tuple[str, ...] = ("slices_plus", "slices", TEXT_COLUMN)
"""Columns read as ready-made token strings, in order of preference; otherwise a ``cif`` column is encoded."""
SUMMARY_FILE = "finetune.json"
TRAINING_DIR = "training"


class FinetuneError(ValueError):
    """A fine-tuning request that cannot work: unknown column, property already conditioned, too few rows."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (``lr`` is the peak AdamW rate, lengths in tokens)."""

    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lr: float = 1e-3
    max_steps: int = 200
    batch_size: int = 16
    warmup_steps: int = 20
    max_length: int = 512
    limit: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class FinetuneResult:
    """Where the fine-tune went and what it trained on."""

    out_dir: Path
    rows_used: int
    rows_dropped_too_long: int
    property_names: tuple[str, ...]
    property_means: tuple[float, ...]
    property_stds: tuple[float, ...]
    trainable_parameters: int
    total_parameters: int
    steps: int
    final_loss: float | None


# -------------------------------------------------------------------------------------------- data


def read_finetune_table(path: str | Path, properties: Sequence[str]) -> pd.DataFrame:
    """The CSV rows with every requested property finite; raises :class:`FinetuneError` for a missing column."""
    table = pd.read_csv(path)
    missing = [name for name in properties if name not in table.columns]
    if missing:
        raise FinetuneError(f"{path}: no column {missing} (columns: {list(table.columns)})")
    finite = np.isfinite(table[list(properties)].to_numpy(dtype=float)).all(axis=1)
    return table[finite].reset_index(drop=True)


def token_strings(table: pd.DataFrame, tokenizer: Any) -> list[str | None]:
    """One token string per row: a ready text column (:data:`TEXT_COLUMNS`) or the encoded ``cif``; None on failure."""
    for column in TEXT_COLUMNS:
        if column in table.columns:
            return [text if isinstance(text, str) and text.strip() else None for text in table[column]]
    if "cif" not in table.columns:
        raise FinetuneError(f"the data need one of the columns {[*TEXT_COLUMNS, 'cif']}, got {list(table.columns)}")
    texts = []
    for cif in table["cif"]:
        try:
            texts.append(tokenizer.structure_to_string(parse_cif(cif)))
        except CrystalEncodeError as err:
            logger.debug("row not encodable: %s", err)
            texts.append(None)
    return texts


def property_statistics(table: pd.DataFrame, names: Sequence[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-property mean and standard deviation (data units) used to standardise the new conditions."""
    if len(table) < 2:
        raise FinetuneError(f"need at least two rows to compute property statistics, got {len(table)}")
    values = table[list(names)].to_numpy(dtype=float)
    stds = np.maximum(values.std(axis=0, ddof=1), 1e-6)
    return tuple(float(m) for m in values.mean(axis=0)), tuple(float(s) for s in stds)


def write_training_split(
    texts: Sequence[str], properties: Sequence[Mapping[str, float]] | None, data_dir: Path
) -> None:
    """Write rows (text + property dict) as the prepared-dataset ``train`` split the training loop reads."""
    columns: dict[str, list[Any]] = {TEXT_COLUMN: list(texts)}
    if properties is not None:
        columns["properties"] = list(properties)
    table = datasets.Dataset.from_dict(columns)
    for old in data_dir.glob("*.parquet") if data_dir.exists() else ():
        old.unlink()
    write_shards(table, data_dir, "train", shard_size=100_000)


# ------------------------------------------------------------------------------------------- model


def extend_conditions(
    base: torch.nn.Module, names: Sequence[str], means: Sequence[float], stds: Sequence[float]
) -> torch.nn.Module:
    """A copy of ``base`` (a MatterGPT) that also conditions on ``names`` (statistics in data units).

    The base's own properties keep their rows of the property embedding; the new rows are initialised
    as in pre-training (the fine-tune or the adapter's ``modules_to_save`` replaces them).
    """
    config = base.config
    overlap = sorted(set(names) & set(config.property_names))
    if overlap:
        raise FinetuneError(f"the base model already conditions on {overlap}; only new properties can be added")
    if not (len(names) == len(means) == len(stds)):
        raise FinetuneError(f"{len(names)} names, {len(means)} means and {len(stds)} stds: one of each per property")
    updates = {
        "property_names": [*config.property_names, *names],
        "property_means": [*map(float, config.property_means), *map(float, means)],
        "property_stds": [*map(float, config.property_stds), *map(float, stds)],
    }
    new_config = type(config).from_dict({**config.to_dict(), **updates})
    model = type(base)(new_config)
    state = base.state_dict()
    old = len(config.property_names)
    embedding = f"{base.base_model_prefix}.property_embedding."
    for key, value in model.state_dict().items():
        if key.startswith(embedding):
            value = value.clone()
            value[:old] = state[key]
            state[key] = value
    model.load_state_dict(state)
    return model.eval()


def lora_model(model: torch.nn.Module, config: FinetuneConfig) -> torch.nn.Module:
    """``model`` wrapped as a PEFT LoRA model (LoRA on :data:`LORA_TARGET_MODULES`, full :data:`CONDITION_MODULES`)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(LORA_TARGET_MODULES),
        modules_to_save=list(CONDITION_MODULES),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def load_finetuned(out_dir: str | Path, base_dir: str | Path | None = None) -> torch.nn.Module:
    """Load a fine-tune from ``out_dir``: the LoRA ``PeftModel`` on its base, or the full model.

    ``base_dir`` defaults to the ``base_model_name_or_path`` recorded in ``adapter_config.json``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    adapter_config = out_dir / "adapter_config.json"
    if not adapter_config.exists():
        return AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=True).eval()
    from peft import PeftModel

    base_dir = base_dir or json.loads(adapter_config.read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(str(out_dir), trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), trust_remote_code=True)
    added = len(config.property_names) - len(base.config.property_names)
    base = extend_conditions(
        base, config.property_names[-added:], config.property_means[-added:], config.property_stds[-added:]
    )
    return PeftModel.from_pretrained(base, str(out_dir)).eval()


# ---------------------------------------------------------------------------------------- training


def _loop_config(out_dir: Path, config: FinetuneConfig, properties: Sequence[str]) -> TrainConfig:
    """The generic loop's settings for a fine-tune (no evaluation split, one checkpoint at the end).

    ``properties`` are all the model's property names: the base's own ones are absent from the rows and
    reach the model as "no condition" (mask 0).
    """
    return TrainConfig.from_dict(
        {
            "output_dir": str(out_dir / TRAINING_DIR),
            "run_name": "crystal-lm-finetune",
            "seed": config.seed,
            "data": {
                "path": str(out_dir / TRAINING_DIR / "dataset"),
                "eval_split": None,
                "max_length": config.max_length,
                "property_conditions": list(properties),
            },
            "optim": {
                "lr": config.lr,
                "weight_decay": 0.0,
                "warmup_steps": config.warmup_steps,
                "schedule": "cosine",
            },
            "loop": {"micro_batch_size": config.batch_size, "max_steps": config.max_steps, "log_every": 10},
            "checkpoint": {"every_steps": config.max_steps, "keep": 1},
        }
    )


def finetune(
    base_dir: str | Path,
    data: str | Path,
    properties: Sequence[str],
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
) -> FinetuneResult:
    """Fine-tune the MatterGPT at ``base_dir`` on ``data`` (CSV) conditioned on the new ``properties``."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    properties = tuple(properties)
    tokenizer = load_tokenizer(str(base_dir))
    table = read_finetune_table(data, properties)
    if config.limit is not None:
        table = table.sample(n=min(config.limit, len(table)), random_state=config.seed).reset_index(drop=True)
    texts = token_strings(table, tokenizer)
    lengths = [len(tokenizer.tokenize(text)) + 2 if text else math.inf for text in texts]
    keep = [i for i, n in enumerate(lengths) if n <= config.max_length]
    dropped = len(table) - len(keep)
    if dropped:
        logger.info("dropped %d of %d rows longer than %d tokens or not encodable", dropped, len(table), config.max_length)
    table = table.iloc[keep].reset_index(drop=True)
    means, stds = property_statistics(table, properties)

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), trust_remote_code=True)
    model = extend_conditions(base, properties, means, stds)
    trained = lora_model(model, config) if config.lora else model
    trainable, total = parameter_counts(trained)
    logger.info("fine-tuning %d of %d parameters (%s)", trainable, total, "LoRA" if config.lora else "full")

    loop_config = _loop_config(out_dir, config, model.config.property_names)
    write_training_split(
        [texts[i] for i in keep],
        table[list(properties)].to_dict("records"),
        Path(loop_config.data.path) / "data",
    )
    inner = trained.get_base_model() if config.lora else trained
    result = train(loop_config, model=inner, tokenizer=tokenizer)
    # The loop's ``final`` folder holds the LoRA-injected weights under non-loadable names: the adapter
    # (or the full model) saved below replaces it.
    shutil.rmtree(Path(loop_config.output_dir) / FINAL_DIR, ignore_errors=True)

    trained.eval()
    if config.lora:
        local = Path(base_dir)
        trained.peft_config["default"].base_model_name_or_path = str(local.resolve() if local.is_dir() else base_dir)
    trained.save_pretrained(str(out_dir))
    model.config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    summary = FinetuneResult(
        out_dir=out_dir,
        rows_used=len(table),
        rows_dropped_too_long=dropped,
        property_names=properties,
        property_means=means,
        property_stds=stds,
        trainable_parameters=trainable,
        total_parameters=total,
        steps=result.steps,
        final_loss=result.metrics.get("train/loss"),
    )
    record = {**asdict(summary), "out_dir": str(out_dir), "base": str(base_dir), "data": str(data),
              "config": asdict(config)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(record, indent=2))
    return summary


__all__ = [
    "CONDITION_MODULES",
    "LORA_TARGET_MODULES",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "condition_tensors",
    "extend_conditions",
    "finetune",
    "load_finetuned",
    "lora_model",
]
