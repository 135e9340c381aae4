"""Share trained models and prepared datasets on the Hugging Face Hub, with filled cards.

``push_folder`` builds one list of ``huggingface_hub.CommitOperationAdd`` (every file of the folder plus a
rendered ``README.md``) and either commits it to the Hub (``HfApi.create_repo`` + ``HfApi.create_commit``)
or, with ``local_dir``, writes the same operations into a local folder laid out like the Hub repo. Offline
tests use the local target and a mocked ``HfApi``; both receive the same operations.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi

from hub_cards import (
    DatasetCardInfo,
    ModelCardInfo,
    load_metrics,
    render_dataset_card,
    render_model_card,
)
from training.data import ENCODE_SYMPREC, PREPARE_REPORT

logger = logging.getLogger(__name__)

REPO_TYPES: tuple[str, ...] = ("model", "dataset")
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
TOKENIZER_REPRESENTATIONS: dict[str, str] = {"WyckoffTokenizer": "wyckoff", "SlicesPlusTokenizer": "slices-plus"}
_SKIPPED_METRIC_PREFIXES: tuple[str, ...] = (
    "histograms.",
    "reference_histograms.",
    "records.",
    "settings.",
    "timings_s.",
)


class HubPushError(ValueError):
    """A folder is not a complete model or dataset repo (missing config, remote code or data files)."""


@dataclass(frozen=True)
class PushResult:
    """Where a folder went and which files it sent (paths inside the repo)."""

    repo_id: str
    repo_type: str
    target: str
    files: tuple[str, ...]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def check_model_folder(folder: Path) -> dict[str, Any]:
    """Check a saved model folder loads with ``trust_remote_code``; return its ``config.json``."""
    config = _read_json(folder / "config.json")
    if not config:
        raise HubPushError(f"{folder}: no config.json; save the model with save_pretrained first")
    if not (folder / "tokenizer_config.json").exists():
        raise HubPushError(f"{folder}: no tokenizer_config.json; save the tokenizer beside the model")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    for where, mapping in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        for reference in _auto_map_references(mapping.get("auto_map", {})):
            module = reference.split("--")[-1].rsplit(".", 1)[0]
            if not (folder / f"{module}.py").exists():
                raise HubPushError(f"{folder}: {where} auto_map names {reference} but {module}.py is missing")
    if config.get("model_type") not in CONFIG_MAPPING_NAMES and "auto_map" not in config:
        raise HubPushError(
            f"{folder}: model_type {config.get('model_type')!r} is not in transformers and config.json has no "
            "auto_map; register the classes with register_for_auto_class before save_pretrained"
        )
    return config


def _auto_map_references(auto_map: dict[str, Any]) -> list[str]:
    references: list[str] = []
    for value in auto_map.values():
        references.extend(v for v in (value if isinstance(value, list) else [value]) if v)
    return references


def find_metrics(folder: Path, metrics_path: str | Path | None = None) -> Path | None:
    """The metrics JSON for a model folder: the given path, ``folder/metrics.json`` or the run's one above it."""
    if metrics_path is not None:
        path = Path(metrics_path)
        if not path.exists():
            raise HubPushError(f"metrics file {path} does not exist")
        return path
    for candidate in (folder / METRICS_FILE, folder.parent / METRICS_FILE):
        if candidate.exists():
            return candidate
    return None


def card_metrics(path: Path | None) -> dict[str, float]:
    """Scalar metrics of a metrics JSON for the card (histogram bins and per-structure records left out)."""
    if path is None:
        return {}
    return {k: v for k, v in load_metrics(path).items() if not k.startswith(_SKIPPED_METRIC_PREFIXES)}


def model_card(
    folder: Path,
    repo_id: str,
    *,
    metrics_path: Path | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    training_data: str = "",
) -> str:
    """The model card of a saved model folder, with the metrics of ``metrics_path``."""
    config = check_model_folder(folder)
    tokenizer_class = _read_json(folder / "tokenizer_config.json").get("tokenizer_class", "")
    info = ModelCardInfo(
        model_name=repo_id.split("/")[-1],
        model_type=str(config.get("model_type", "unknown")),
        representation=TOKENIZER_REPRESENTATIONS.get(tokenizer_class, tokenizer_class or "unknown"),
        repo_id=repo_id,
        license=license,
        datasets=tuple(datasets),
        training_data=training_data,
    )
    return render_model_card(info, card_metrics(metrics_path), metrics_source=metrics_path.name if metrics_path else "")


def dataset_card(folder: Path, repo_id: str) -> str:
    """The dataset card of a prepared dataset folder, re-rendered from its ``prepare_report.json``."""
    report = _read_json(folder / PREPARE_REPORT)
    if not report:
        raise HubPushError(f"{folder}: no {PREPARE_REPORT}; prepare the dataset with crystal-lm prepare-data")
    if not list((folder / "data").glob("*.parquet")):
        raise HubPushError(f"{folder}: no data/*.parquet shards")
    info = DatasetCardInfo(
        pretty_name=repo_id.split("/")[-1],
        representation=report["representation"],
        source=report["source"],
        license=report["license"],
        split_counts={k: v for k, v in report["split_counts"].items() if k in report["num_shards"]},
        split_failures=report["split_failures"],
        failures_by_type=report["failures_by_type"],
        split_rule=report["split_rule"],
        property_names=report["property_columns"],
        symprec=ENCODE_SYMPREC,
        repo_id=repo_id,
    )
    return render_dataset_card(info)


def upload_operations(folder: Path, card_text: str, exclude: Sequence[str] = ()) -> list[CommitOperationAdd]:
    """One ``CommitOperationAdd`` per file of ``folder`` (hidden files and ``exclude`` skipped) plus the card."""
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative == CARD_FILE or relative in exclude:
            continue
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path)))
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_text.encode()))
    return operations


def _write_local(operations: Sequence[CommitOperationAdd], local_dir: Path) -> None:
    """Apply the commit operations to a local folder (the offline stand-in for a Hub repo)."""
    for op in operations:
        target = local_dir / op.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(op.path_or_fileobj, bytes):
            target.write_bytes(op.path_or_fileobj)
        else:
            shutil.copyfile(op.path_or_fileobj, target)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    local_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    training_data: str = "",
    api: HfApi | None = None,
    commit_message: str = "Upload with crystal-lm",
) -> PushResult:
    """Upload a saved model folder or a prepared dataset folder with a rendered card.

    With ``local_dir`` the files are written there instead of the Hub (same operations, no network).
    """
    folder = Path(folder)
    if repo_type not in REPO_TYPES:
        raise HubPushError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    if repo_type == "model":
        metrics = find_metrics(folder, metrics_path)
        card = model_card(
            folder, repo_id, metrics_path=metrics, license=license, datasets=datasets, training_data=training_data
        )
        operations = upload_operations(folder, card)
    else:
        operations = upload_operations(folder, dataset_card(folder, repo_id))
    files = tuple(op.path_in_repo for op in operations)
    if local_dir is not None:
        _write_local(operations, Path(local_dir))
        logger.info("wrote %d files of %s to %s", len(files), repo_id, local_dir)
        return PushResult(repo_id, repo_type, str(Path(local_dir).resolve()), files)
    api = api or HfApi()
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type=repo_type)
    logger.info("pushed %d files to %s", len(files), url)
    return PushResult(repo_id, repo_type, str(url), files)


def run_training_data(run_dir: Path) -> tuple[tuple[str, ...], str]:
    """What a training run was trained on, from its ``config.yaml``: dataset names, and a description.

    A Hub ``data.path`` is its own dataset id. A local ``data.path`` with a ``prepare_report.json`` is
    named by its source (a Hub id, or the source file's stem, e.g. ``mp20_sample``) and described by its
    source, size and licence.
    """
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return (), ""
    path = str((yaml.safe_load(config_path.read_text()) or {}).get("data", {}).get("path", ""))
    report = _read_json(Path(path) / PREPARE_REPORT) if path and Path(path).is_dir() else {}
    if report:
        source = str(report["source"])
        name = source if _is_hub_id(source) else Path(source).stem
        return (name,), (
            f"Prepared with `crystal-lm prepare-data` from `{Path(source).name}` "
            f"({report['split_counts'].get('train', 0)} training structures, {report['representation']} "
            f"representation, data licence `{report['license']}`)."
        )
    return ((path,), "") if _is_hub_id(path) else ((), "")


def _is_hub_id(text: str) -> bool:
    """``ORG/NAME`` that is not a local path."""
    return bool(text) and not Path(text).exists() and text.count("/") == 1
