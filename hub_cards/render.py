"""Render Hub model and dataset cards (YAML metadata + Markdown body) from Jinja2 templates.

The renderer reads plain values and metrics JSON files only; it imports no model code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
EVAL_TASK_TYPE = "text-generation"
EVAL_TASK_NAME = "Crystal structure generation"
_NOT_RESULTS: tuple[str, ...] = ("steps", "tokens_seen", "n", "n_parsed", "n_valid_samples")
"""Flattened metric names that are run bookkeeping or counts, not results (with the ``train/`` prefix)."""
CRYSTAL_TAGS: tuple[str, ...] = ("crystal-generation", "materials-science", "crystal-structure", "crystal-lm")
_SIZE_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


@dataclass(frozen=True)
class DatasetCardInfo:
    """What a dataset card states: provenance, split counts and encode failures by error type."""

    pretty_name: str
    representation: str
    source: str
    license: str
    split_counts: Mapping[str, int]
    split_failures: Mapping[str, int]
    failures_by_type: Mapping[str, int]
    split_rule: str
    property_names: Sequence[str]
    symprec: float
    repo_id: str = "ORG/NAME"
    citation: str = ""
    data_file_pattern: str = "data/{split}-*.parquet"


@dataclass(frozen=True)
class ModelCardInfo:
    """What a model card states besides the metrics: names, data, licence."""

    model_name: str
    model_type: str
    representation: str
    repo_id: str = "ORG/NAME"
    license: str = "apache-2.0"
    datasets: Sequence[str] = field(default_factory=tuple)
    training_data: str = ""
    """Free-text description of the training data (used when it is not a Hub dataset)."""
    base_model: str | None = None
    dataset_name: str = ""
    """The evaluation/training data's name for ``model-index`` when no Hub dataset id is known."""


@dataclass(frozen=True)
class PropertySummary:
    """One property an adapter adds: its unit and the statistics of its fine-tuning values (that unit)."""

    name: str
    unit: str
    mean: float
    std: float
    minimum: float
    maximum: float


@dataclass(frozen=True)
class AdapterCardInfo:
    """What a PEFT adapter card states: the base, the new properties, the fine-tune data and run."""

    adapter_name: str
    base_model: str
    """The base's Hub id, else its folder name (never a machine-local absolute path)."""
    model_type: str
    representation: str
    properties: Sequence[PropertySummary]
    data_name: str
    rows: int
    steps: int
    final_loss: float | None
    lora_rank: int
    resize_base: bool
    """Whether the base must be resized to the adapter's tokenizer before ``PeftModel.from_pretrained``."""
    trainable_parameters: int
    total_parameters: int
    license: str = "apache-2.0"


def size_category(n: int) -> str:
    """The Hub's size-category label for ``n`` examples."""
    for bound, label in _SIZE_CATEGORIES:
        if n < bound:
            return label
    return "n>10M"


def flatten_metrics(metrics: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics into ``{"a.b": value}``, keeping finite numbers only (bools dropped)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def load_metrics(path: str | Path) -> dict[str, float]:
    """Read a metrics JSON file and flatten it (see :func:`flatten_metrics`)."""
    return flatten_metrics(json.loads(Path(path).read_text()))


def _format_value(value: float) -> str:
    return f"{int(value)}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def render_dataset_card(info: DatasetCardInfo) -> str:
    """Render the dataset card (README.md) of a prepared dataset folder."""
    splits = list(info.split_counts)
    card_data = DatasetCardData(
        license=info.license,
        pretty_name=info.pretty_name,
        size_categories=size_category(sum(info.split_counts.values())),
        task_categories=["text-generation"],
        tags=list(CRYSTAL_TAGS) + [info.representation],
        configs=[
            {
                "config_name": "default",
                "data_files": [
                    {"split": split, "path": info.data_file_pattern.format(split=split)} for split in splits
                ],
            }
        ],
    )
    card = DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATE_DIR / "dataset_card.md"),
        pretty_name=info.pretty_name,
        representation=info.representation,
        source=info.source,
        license=info.license,
        repo_id=info.repo_id,
        citation=info.citation,
        split_rule=info.split_rule,
        symprec=info.symprec,
        property_names=", ".join(f"`{name}`" for name in info.property_names) or "none",
        split_rows=[
            {"split": s, "count": info.split_counts[s], "failed": info.split_failures.get(s, 0)} for s in splits
        ],
        failure_rows=[
            {"error_type": name, "count": count}
            for name, count in sorted(info.failures_by_type.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    )
    return str(card)


def eval_results(info: ModelCardInfo, metrics: Mapping[str, float]) -> list[EvalResult]:
    """``model-index`` entries (the Hub's results format) of the result metrics: one per metric.

    Run bookkeeping (steps, tokens, counts) and training-time values (``train/...``) are left out; the
    dataset is the first Hub dataset id, else ``info.dataset_name``.
    """
    dataset = info.datasets[0] if info.datasets else (info.dataset_name or "unknown")
    return [
        EvalResult(
            task_type=EVAL_TASK_TYPE,
            task_name=EVAL_TASK_NAME,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=name.replace("/", "_").replace(".", "_"),
            metric_name=name,
            metric_value=value,
        )
        for name, value in sorted(metrics.items())
        if name not in _NOT_RESULTS and not name.startswith("train/")
    ]


def render_model_card(info: ModelCardInfo, metrics: Mapping[str, float] | None = None, metrics_source: str = "") -> str:
    """Render a model card (README.md); ``metrics`` are flattened names -> values shown as a table."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=info.license,
        tags=list(CRYSTAL_TAGS) + [info.representation, info.model_type],
        datasets=list(info.datasets) or None,
        base_model=info.base_model,
        model_name=info.model_name,
        eval_results=eval_results(info, metrics or {}) or None,
    )
    if info.training_data:
        datasets_text = info.training_data
    elif info.datasets:
        datasets_text = "Trained on " + ", ".join(f"`{name}`" for name in info.datasets) + "."
    else:
        datasets_text = "The training data were not recorded."
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_DIR / "model_card.md"),
        model_name=info.model_name,
        model_type=info.model_type,
        representation=info.representation,
        repo_id=info.repo_id,
        license=info.license,
        datasets_text=datasets_text,
        metric_rows=[{"name": k, "value": _format_value(v)} for k, v in sorted((metrics or {}).items())],
        metrics_source=metrics_source,
    )
    return str(card)


def render_adapter_card(info: AdapterCardInfo) -> str:
    """Render the model card (README.md) of a PEFT LoRA adapter folder."""
    card_data = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation",
        license=info.license,
        base_model=info.base_model,
        tags=[*CRYSTAL_TAGS, info.representation, info.model_type, "peft", "lora"],
        new_properties=[
            {"name": p.name, "unit": p.unit, **{key: float(f"{value:.6g}") for key, value in
                                                 (("mean", p.mean), ("std", p.std), ("min", p.minimum), ("max", p.maximum))}}
            for p in info.properties
        ],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_DIR / "adapter_card.md"),
        adapter_name=info.adapter_name,
        base_model=info.base_model,
        model_type=info.model_type,
        representation=info.representation,
        property_rows=[
            {"name": p.name, "unit": p.unit or "as in the data", "mean": f"{p.mean:.4g}", "std": f"{p.std:.4g}",
             "min": f"{p.minimum:.4g}", "max": f"{p.maximum:.4g}"}
            for p in info.properties
        ],
        example_properties={p.name: float(f"{p.mean:.4g}") for p in info.properties},
        data_name=info.data_name,
        rows=info.rows,
        steps=info.steps,
        final_loss="not recorded" if info.final_loss is None else f"{info.final_loss:.4g}",
        lora_rank=info.lora_rank,
        resize_base=info.resize_base,
        trainable=f"{info.trainable_parameters:,}",
        total=f"{info.total_parameters:,}",
        license=info.license,
    )
    return str(card)
