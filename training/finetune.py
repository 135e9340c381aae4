"""Fine-tune a saved MatterGPT or WyckoffGPT on property conditions it was not trained with (PEFT LoRA or full).

The SLICES-PLUS paper fine-tunes a pre-trained MatterGPT on a few thousand cubic crystals to target bulk
and shear moduli (K, G in GPa). Here, for either generator:

- **MatterGPT** (conditions are tensors): :func:`extend_conditions` builds the base with the new property
  names appended to ``config.property_names`` and their normalisation statistics (mean, std in data units,
  from the fine-tuning rows) in ``config.property_means`` / ``property_stds``; the new property-embedding
  rows are freshly initialised. LoRA: the attention/MLP linears (:data:`LORA_TARGET_MODULES`) get adapters
  and the property embedding (:data:`CONDITION_MODULES`, with its statistics buffers) trains in full as a
  PEFT ``modules_to_save``. The embedding grows itself when an adapter is loaded onto the untouched base.
- **WyckoffGPT** (conditions are prompt text ``prop:<name> <num>``, values in data units as for its default
  properties): :func:`add_property_tokens` appends one ``prop:<name>`` token per property at the END of the
  vocabulary (every existing id stays) and resizes the embeddings; the config's ``added_token_kind``
  (``"scalar"``) makes ``resize_token_embeddings`` register the appended ids as scalar value labels, so the
  value head draws a value after them. LoRA: adapters on the same linears, the new token rows as PEFT
  ``trainable_token_indices`` (tied LM head included) and the value head (:data:`VALUE_MODULES`) in full.
  Because the knowledge "these ids are scalar labels" follows from the resize itself, the two standard PEFT
  loads (``AutoPeftModelForCausalLM``, which resizes the base to the adapter's tokenizer, and ``PeftModel``
  on a base resized with ``base.resize_token_embeddings(len(tokenizer))``) rebuild it from the base config.

Training runs in the generic loop (:func:`training.loop.train`) on the ``PeftModel`` itself (the loop reads
the batch keys a PEFT model takes from the model it wraps); the adapter is then saved with a model card
(``README.md``).

:func:`load_finetuned` loads either: the LoRA ``PeftModel`` on its base (resized to the adapter's tokenizer
when needed, the adapter's property names adopted by the config), or the full fine-tuned model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

from crystal_tokenizers import PromptCrystalTokenizer
from crystal_tokenizers.errors import CrystalEncodeError
from crystal_tokenizers.loading import load_tokenizer
from hub_cards.render import AdapterCardInfo, PropertySummary, render_adapter_card
from training.data import TEXT_COLUMN, write_shards
from training.hub import TOKENIZER_REPRESENTATIONS
from training.conditions import condition_tensors  # noqa: F401 - re-exported (moved)
from training.io import parse_cif
from training.loop import FINAL_DIR, TrainConfig, train

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
"""MatterGPT linears that get LoRA adapters: attention QKV and output projections, MLP in and out."""
CONDITION_MODULES: tuple[str, ...] = ("property_embedding",)
"""MatterGPT modules trained in full and saved with the adapter (PEFT ``modules_to_save``): the new conditions."""
VALUE_MODULES: tuple[str, ...] = ("numeric_head",)
"""WyckoffGPT modules trained in full and saved with the adapter: the value head learns the new values."""
TOKEN_EMBEDDING = "wte"
"""Name of the token embedding whose new rows a WyckoffGPT adapter trains (PEFT ``trainable_token_indices``)."""
TEXT_COLUMNS: tuple[str, ...] = ("slices_plus", "slices", TEXT_COLUMN)
"""Columns read as ready-made token strings, in order of preference; otherwise a ``cif`` column is encoded."""
SUMMARY_FILE = "finetune.json"
TRAINING_DIR = "training"
CARD_FILE = "README.md"
KNOWN_UNITS: dict[str, str] = {
    "formation_energy_per_atom": "eV/atom", "e_above_hull": "eV/atom", "band_gap": "eV",
    "bulk_modulus": "GPa", "shear_modulus": "GPa", "K_VRH": "GPa", "G_VRH": "GPa",
}
"""Units of property names the project's data use; names ending ``_gpa``, ``_ev``, ``_g_cm3``... too."""
_UNIT_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_gpa", "GPa"), ("_ev_per_atom", "eV/atom"), ("_ev", "eV"), ("_g_cm3", "g/cm³"), ("_a3", "Å³"),
)


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
    model_type: str = ""
    base_model: str = ""
    """The base's Hub id, else its local folder name (what the card and ``adapter_config.json`` name)."""


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


def conditioned_strings(table: pd.DataFrame, tokenizer: Any, properties: Sequence[str]) -> list[str | None]:
    """Wyckoff text per row of the ``cif`` column with ``prop:<name> <value>`` conditions; None when not encodable."""
    if "cif" not in table.columns:
        raise FinetuneError(f"a WyckoffGPT fine-tune encodes a 'cif' column, got {list(table.columns)}")
    texts: list[str | None] = []
    for record in table[["cif", *properties]].to_dict("records"):
        try:
            conditions = {name: float(record[name]) for name in properties}
            texts.append(tokenizer.structure_to_string(parse_cif(record["cif"]), properties=conditions))
        except CrystalEncodeError as err:
            logger.debug("row not encodable: %s", err)
            texts.append(None)
    return texts


def property_unit(name: str) -> str:
    """The unit of a property column by its name (:data:`KNOWN_UNITS`, suffixes ``_gpa``...), else ""."""
    if name in KNOWN_UNITS:
        return KNOWN_UNITS[name]
    return next((unit for suffix, unit in _UNIT_SUFFIXES if name.lower().endswith(suffix)), "")


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


def add_property_tokens(model: torch.nn.Module, tokenizer: Any, names: Sequence[str]) -> list[int]:
    """Resize a WyckoffGPT to ``tokenizer`` (which has ``prop:<name>`` for ``names``); return the new ids.

    The resize registers appended ids as value labels of ``config.added_token_kind``; the new property
    tokens must come out as scalar labels, else :class:`FinetuneError`.
    """
    model.resize_token_embeddings(len(tokenizer))
    new_ids = [tokenizer.convert_tokens_to_ids(f"prop:{name}") for name in names]
    scalar = set(model.config.numeric_kind_token_ids.get("scalar", ()))
    if not scalar.issuperset(new_ids):
        raise FinetuneError(
            f"the base config gives appended tokens the value kind {getattr(model.config, 'added_token_kind', None)!r}, "
            f"so the new tokens {[f'prop:{name}' for name in names]} would not be scalar value labels; "
            "set config.added_token_kind = 'scalar'"
        )
    return new_ids


def lora_model(model: torch.nn.Module, config: FinetuneConfig, new_token_ids: Sequence[int] = ()) -> torch.nn.Module:
    """``model`` wrapped as a PEFT LoRA model on :data:`LORA_TARGET_MODULES`.

    MatterGPT: the property embedding (:data:`CONDITION_MODULES`) trains in full. WyckoffGPT (``new_token_ids``
    given): the rows of the new tokens train (``trainable_token_indices``) and the value head in full.
    """
    from peft import LoraConfig, get_peft_model

    extra: dict[str, Any] = (
        {"modules_to_save": list(VALUE_MODULES), "trainable_token_indices": {TOKEN_EMBEDDING: list(new_token_ids)}}
        if new_token_ids else {"modules_to_save": list(CONDITION_MODULES)}
    )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
        **extra,
    )
    return get_peft_model(model, lora)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_base(out_dir: str | Path) -> str:
    """Where an adapter's base loads from: ``base_model_name_or_path`` of ``adapter_config.json`` when it is
    a local folder, else the local base recorded in :data:`SUMMARY_FILE` when that folder exists, else the
    recorded name (a Hub id)."""
    out_dir = Path(out_dir)
    recorded = json.loads((out_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    summary = out_dir / SUMMARY_FILE
    local = json.loads(summary.read_text()).get("base") if summary.exists() else None
    if Path(recorded).is_dir() or not (local and Path(local).is_dir()):
        return recorded
    return local


def adopt_adapter_conditions(model: torch.nn.Module, out_dir: str | Path) -> None:
    """Give a base carrying an adapter the adapter's condition names (MatterGPT ``property_*`` fields).

    The property embedding grows with the adapter's weights; its names live in the adapter folder's
    ``config.json``. A WyckoffGPT's new labels already come from the resize: checked, not copied.
    """
    saved = json.loads((Path(out_dir) / "config.json").read_text())
    config = model.config
    if "property_names" in saved:
        for name in ("property_names", "property_means", "property_stds"):
            setattr(config, name, saved[name])
    wanted = {kind: sorted(ids) for kind, ids in (saved.get("numeric_kind_token_ids") or {}).items()}
    have = {kind: sorted(ids) for kind, ids in (getattr(config, "numeric_kind_token_ids", None) or {}).items()}
    if wanted and wanted != have:
        raise FinetuneError(f"{out_dir}: the base's value labels after resizing differ from the adapter's "
                            f"numeric_kind_token_ids (resize the base to the adapter's tokenizer)")


def load_finetuned(out_dir: str | Path, base_dir: str | Path | None = None) -> torch.nn.Module:
    """Load a fine-tune from ``out_dir``: the LoRA ``PeftModel`` on its base, or the full model (eval mode).

    ``base_dir`` defaults to :func:`adapter_base`. As ``AutoPeftModelForCausalLM`` does, the base is resized
    to the adapter's tokenizer when that is larger (a WyckoffGPT adapter's new ``prop:`` tokens).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if not (out_dir / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=True).eval()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(base_dir or adapter_base(out_dir)), trust_remote_code=True)
    size = len(load_tokenizer(str(out_dir)))
    if size > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(size)
    model = PeftModel.from_pretrained(base, str(out_dir))
    adopt_adapter_conditions(model, out_dir)
    return model.eval()


# ---------------------------------------------------------------------------------------- training


def _loop_config(out_dir: Path, config: FinetuneConfig, properties: Sequence[str]) -> TrainConfig:
    """The generic loop's settings for a fine-tune (no evaluation split, one checkpoint at the end).

    ``properties`` are all the model's property names (MatterGPT; none for a WyckoffGPT, whose conditions
    are in the text): the base's own ones are absent from the rows and reach the model as "no condition".
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


def _rows_that_fit(
    table: pd.DataFrame, texts: Sequence[str | None], tokenizer: Any, max_length: int
) -> tuple[pd.DataFrame, list[str], int]:
    """The rows (and their texts) that encoded and fit ``max_length`` tokens with ``<bos>``/``<eos>``; the count dropped."""
    keep = [i for i, text in enumerate(texts) if text and len(tokenizer.tokenize(text)) + 2 <= max_length]
    dropped = len(table) - len(keep)
    if dropped:
        logger.info("dropped %d of %d rows longer than %d tokens or not encodable", dropped, len(table), max_length)
    return table.iloc[keep].reset_index(drop=True), [texts[i] for i in keep], dropped


def base_model_name(base_dir: str | Path, base_id: str | None = None) -> str:
    """The base as a card and ``adapter_config.json`` name it: ``base_id``, a Hub id given as the base, else the
    local folder's name (the run's name for a training run's ``final`` folder; never a machine-local path)."""
    if base_id:
        return base_id
    folder = Path(base_dir)
    if not folder.is_dir():
        return str(base_dir)
    return folder.resolve().parent.name if folder.name == FINAL_DIR else folder.name


def finetune(
    base_dir: str | Path,
    data: str | Path,
    properties: Sequence[str],
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    base_id: str | None = None,
) -> FinetuneResult:
    """Fine-tune the MatterGPT or WyckoffGPT at ``base_dir`` on ``data`` (CSV) conditioned on the new ``properties``.

    ``base_id`` is the base's Hub id: the adapter's ``base_model_name_or_path`` and the card name it (the local
    ``base_dir`` is still recorded in :data:`SUMMARY_FILE` for local loading).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    properties = tuple(properties)
    tokenizer = load_tokenizer(str(base_dir))
    in_text = isinstance(tokenizer, PromptCrystalTokenizer)
    if in_text:
        try:
            tokenizer = tokenizer.with_properties(properties)
        except ValueError as err:
            raise FinetuneError(f"{base_dir}: {err}") from err
    table = read_finetune_table(data, properties)
    if config.limit is not None:
        table = table.sample(n=min(config.limit, len(table)), random_state=config.seed).reset_index(drop=True)
    texts = conditioned_strings(table, tokenizer, properties) if in_text else token_strings(table, tokenizer)
    table, texts, dropped = _rows_that_fit(table, texts, tokenizer, config.max_length)
    means, stds = property_statistics(table, properties)

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), trust_remote_code=True)
    new_ids: list[int] = []
    if in_text:
        new_ids = add_property_tokens(model, tokenizer, properties)
    else:
        model = extend_conditions(model, properties, means, stds)
    trained = lora_model(model, config, new_ids) if config.lora else model
    trainable, total = parameter_counts(trained)
    logger.info("fine-tuning %d of %d parameters (%s)", trainable, total, "LoRA" if config.lora else "full")

    loop_config = _loop_config(out_dir, config, () if in_text else model.config.property_names)
    write_training_split(
        texts,
        None if in_text else table[list(properties)].to_dict("records"),
        Path(loop_config.data.path) / "data",
    )
    result = train(loop_config, model=trained, tokenizer=tokenizer)
    # The adapter (or the full model) saved below, with its config, tokenizer and card, replaces the loop's copy.
    shutil.rmtree(Path(loop_config.output_dir) / FINAL_DIR, ignore_errors=True)

    trained.eval()
    local_base = str(Path(base_dir).resolve()) if Path(base_dir).is_dir() else str(base_dir)
    if config.lora:
        trained.peft_config["default"].base_model_name_or_path = base_id or local_base
        trained.save_pretrained(str(out_dir), save_embedding_layers=False)  # the new rows are trainable tokens
    else:
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
        model_type=str(model.config.model_type),
        base_model=base_model_name(base_dir, base_id),
    )
    record = {**asdict(summary), "out_dir": str(out_dir), "base": local_base, "data": str(data),
              "config": asdict(config)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(record, indent=2))
    if config.lora:
        (out_dir / CARD_FILE).write_text(adapter_card(summary, table, data, config, resized=in_text, tokenizer=tokenizer))
    return summary


def adapter_card(
    result: FinetuneResult, table: pd.DataFrame, data: str | Path, config: FinetuneConfig, *, resized: bool,
    tokenizer: Any,
) -> str:
    """The adapter folder's model card (YAML front matter for the Hub + loading snippets)."""
    values = table[list(result.property_names)].to_numpy(dtype=float)
    properties = tuple(
        PropertySummary(name=name, unit=property_unit(name), mean=mean, std=std,
                        minimum=float(values[:, i].min()), maximum=float(values[:, i].max()))
        for i, (name, mean, std) in enumerate(zip(result.property_names, result.property_means, result.property_stds))
    )
    info = AdapterCardInfo(
        adapter_name=result.out_dir.name,
        base_model=result.base_model,
        model_type=result.model_type,
        representation=TOKENIZER_REPRESENTATIONS.get(type(tokenizer).__name__, type(tokenizer).__name__),
        properties=properties,
        data_name=Path(data).name,
        rows=result.rows_used,
        steps=result.steps,
        final_loss=result.final_loss,
        lora_rank=config.lora_rank,
        resize_base=resized,
        trainable_parameters=result.trainable_parameters,
        total_parameters=result.total_parameters,
    )
    return render_adapter_card(info)


__all__ = [
    "CONDITION_MODULES",
    "LORA_TARGET_MODULES",
    "VALUE_MODULES",
    "add_property_tokens",
    "adapter_base",
    "adapter_card",
    "adopt_adapter_conditions",
    "base_model_name",
    "conditioned_strings",
    "property_unit",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "condition_tensors",
    "extend_conditions",
    "finetune",
    "load_finetuned",
    "lora_model",
]
