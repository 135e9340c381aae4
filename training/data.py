"""Crystal datasets for training: prepare (encode + split + shard), load (map-style or streaming), collate.

``prepare_dataset`` reads structures from a CSV/JSON/Parquet file with a CIF column, a folder of CIF
files, a saved ``datasets`` folder or a Hub repo id, encodes them with a crystal tokenizer and writes a
folder laid out like a Hub dataset repo (``README.md`` + ``data/{split}-{i:05d}-of-{n:05d}.parquet``).
``load_split`` reads such a folder or a Hub repo id through one code path, map-style or streaming.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import datasets.distributed
import numpy as np
import torch

from crystal_tokenizers import CRYSTAL_SYSTEMS
from crystal_tokenizers.errors import (
    CrystalEncodeError,
    SymmetryAnalysisError,
)
from hub_cards import DatasetCardInfo, render_dataset_card

logger = logging.getLogger(__name__)

REPRESENTATIONS: tuple[str, ...] = ("wyckoff", "slices-plus", "slices")
TEXT_CONDITION_REPRESENTATIONS: frozenset[str] = frozenset({"wyckoff"})
"""Representations whose strings carry a condition prefix (SLICES-PLUS models take conditions as inputs)."""
_STRUCTURAL_CONDITIONS: frozenset[str] = frozenset({"crystal_system", "space_group", "elements", "composition"})
SPLITS: tuple[str, ...] = ("train", "validation", "test")
ENCODE_SYMPREC = 0.01
"""spglib tolerance (Å) for the space-group label of a training structure (the encoding default)."""
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
DEFAULT_SHARD_SIZE = 50_000
PREPARE_REPORT = "prepare_report.json"
TEXT_COLUMN = "text"
LOCAL_CACHE_DIR = ".cache"
_SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation"}
_ID_COLUMNS: tuple[str, ...] = ("material_id", "id", "mp_id", "name")
_NON_PROPERTY_COLUMNS: frozenset[str] = frozenset(
    {"split", "cif", "spacegroup.number", "space_group", "nsites", "num_sites", "kpoint_density", "Unnamed: 0"}
)
_TABLE_BUILDERS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_LICENCE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"CC[ -]BY[ -]4\.0", "cc-by-4.0"),
    (r"CC[ -]BY[ -]SA[ -]4\.0", "cc-by-sa-4.0"),
    (r"CC0", "cc0-1.0"),
    (r"\bMIT\b", "mit"),
    (r"Apache[ -]2\.0", "apache-2.0"),
)


class DataPreparationError(ValueError):
    """The input of ``prepare_dataset`` cannot be read (missing CIF column, unknown format, empty)."""


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def make_tokenizer(representation: str, pretrained: str | None = None) -> Any:
    """The crystal tokenizer of ``representation``, or the one saved at ``pretrained`` (path or repo id)."""
    from crystal_tokenizers.loading import load_tokenizer

    if pretrained is not None:
        return load_tokenizer(pretrained)
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}; expected one of {REPRESENTATIONS}")
    return load_tokenizer(representation)


# --------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------


def _read_cif_folder(folder: Path) -> datasets.Dataset:
    paths = sorted(folder.rglob("*.cif"))
    return datasets.Dataset.from_dict(
        {
            "material_id": [str(p.relative_to(folder).with_suffix("")) for p in paths],
            "cif": [p.read_text() for p in paths],
        }
    )


def _with_split_column(table: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
    """One table; a ``DatasetDict``'s split names become a ``split`` column."""
    if isinstance(table, datasets.Dataset):
        return table
    parts = [
        part.add_column("split", [name] * len(part)) for name, part in table.items() if "split" not in part.column_names
    ]
    parts += [part for part in table.values() if "split" in part.column_names]
    return datasets.concatenate_datasets(parts)


def read_source(source: str | Path) -> datasets.Dataset:
    """Read structures from a file, a CIF folder, a ``datasets`` folder or a Hub repo id into one table."""
    path = Path(source)
    if path.is_file():
        builder = _TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataPreparationError(
                f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(_TABLE_BUILDERS)}"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _with_split_column(datasets.load_from_disk(str(path)))
        if any(path.glob("*.cif")):
            return _read_cif_folder(path)
        return _with_split_column(datasets.load_dataset(str(path), cache_dir=str(path / LOCAL_CACHE_DIR)))
    return _with_split_column(datasets.load_dataset(str(source)))


def source_license(source: str | Path) -> str | None:
    """The licence of a source: its dataset card's ``license`` field, or a licence named in a README beside it."""
    path = Path(source)
    readme = (path if path.is_dir() else path.parent) / "README.md"
    if not readme.exists():
        if path.exists():
            return None
        try:
            from huggingface_hub import DatasetCard

            return DatasetCard.load(str(source)).data.get("license")
        except Exception as err:  # noqa: BLE001 - the card is optional metadata; any failure means "unknown"
            logger.info("no dataset card for %s: %s", source, err)
            return None
    text = readme.read_text(errors="replace")
    front = re.match(r"^---\n(.*?)\n---", text, flags=re.DOTALL)
    if front:
        match = re.search(r"^license:\s*(\S+)", front.group(1), flags=re.MULTILINE)
        if match:
            return match.group(1)
    for pattern, licence in _LICENCE_PATTERNS:
        if re.search(pattern, text):
            return licence
    return None


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from ``key`` (SHA-256), the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """``train``/``validation``/``test`` for ``key`` by :func:`hash_fraction` and cumulative ``fractions``."""
    if len(fractions) != len(SPLITS) or not math.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    value = hash_fraction(key)
    for name, bound in zip(SPLITS, itertools.accumulate(fractions)):
        if value < bound:
            return name
    return SPLITS[-1]


def normalise_split_name(name: str) -> str:
    """``val``/``valid``/``dev`` -> ``validation``; other names unchanged (lower-cased)."""
    lowered = str(name).strip().lower()
    return _SPLIT_ALIASES.get(lowered, lowered)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeOptions:
    """How rows are encoded: which columns to read and which conditions go into the text prefix."""

    cif_column: str = "cif"
    id_column: str | None = None
    property_columns: tuple[str, ...] = ()
    text_conditions: tuple[str, ...] = ()
    symprec: float = ENCODE_SYMPREC


def _text_condition_kwargs(names: Sequence[str], properties: Mapping[str, float | None]) -> dict[str, Any]:
    """Keyword conditions for ``tokenizer.structure_to_string``.

    ``crystal_system``, ``space_group``, ``elements`` and ``composition`` are taken from the structure by
    the tokenizer itself (``True``); ``stability`` uses the row's ``e_above_hull`` (eV/atom); any other
    name is a numeric property of the row. Missing values are left out of the prefix.
    """
    kwargs: dict[str, Any] = {}
    numeric: dict[str, float] = {}
    for name in names:
        if name in _STRUCTURAL_CONDITIONS:
            kwargs[name] = True
        elif name == "stability":
            if _is_given(properties.get("e_above_hull")):
                kwargs["e_above_hull"] = float(properties["e_above_hull"])
        elif _is_given(properties.get(name)):
            numeric[name] = float(properties[name])
    if numeric:
        kwargs["properties"] = numeric
    return kwargs


def _is_given(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def encode_row(
    cif: str, properties: Mapping[str, float | None], tokenizer: Any, options: EncodeOptions
) -> dict[str, Any]:
    """Parse, label and encode one CIF; failures come back as ``error_type``/``error`` instead of raising."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from training.io import parse_cif

    row: dict[str, Any] = {
        "formula": "",
        "num_sites": 0,
        "space_group": 0,
        "crystal_system": "",
        TEXT_COLUMN: "",
        "error_type": "",
        "error": "",
    }
    try:
        structure = parse_cif(cif)
        row["formula"] = structure.composition.reduced_formula
        row["num_sites"] = len(structure)
        try:
            analyzer = SpacegroupAnalyzer(structure, symprec=options.symprec)
            row["space_group"] = int(analyzer.get_space_group_number())
            row["crystal_system"] = analyzer.get_crystal_system()
        except Exception as err:
            raise SymmetryAnalysisError(f"spglib failed at symprec {options.symprec}: {err}") from err
        conditions = _text_condition_kwargs(options.text_conditions, properties)
        row[TEXT_COLUMN] = tokenizer.structure_to_string(structure, **conditions)
    except CrystalEncodeError as err:
        row["error_type"] = type(err).__name__
        row["error"] = str(err)
    return row


def _encode_batch(batch: dict[str, list], tokenizer: Any, options: EncodeOptions) -> dict[str, list]:
    """``datasets.map`` function: encode a batch of rows (see :func:`encode_row`)."""
    n = len(batch[options.cif_column])
    ids = (
        batch[options.id_column]
        if options.id_column
        else [hashlib.sha256(cif.encode()).hexdigest()[:16] for cif in batch[options.cif_column]]
    )
    properties = [
        {name: (None if batch[name][i] is None else float(batch[name][i])) for name in options.property_columns}
        for i in range(n)
    ]
    rows = [encode_row(batch[options.cif_column][i], properties[i], tokenizer, options) for i in range(n)]
    out: dict[str, list] = {key: [r[key] for r in rows] for key in rows[0]} if rows else {}
    out["material_id"] = [str(x) for x in ids]
    out["cif"] = list(batch[options.cif_column])
    if options.property_columns:
        out["properties"] = properties
    return out


def default_property_columns(table: datasets.Dataset, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Float columns of ``table`` that are material properties (not ids, splits or symmetry labels)."""
    skip = _NON_PROPERTY_COLUMNS | set(exclude)
    return tuple(
        name
        for name, feature in table.features.items()
        if name not in skip and isinstance(feature, datasets.Value) and feature.dtype.startswith("float")
    )


# --------------------------------------------------------------------------------------------------
# Preparing a dataset folder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """One structure that could not be encoded."""

    material_id: str
    split: str
    error_type: str
    message: str


@dataclass(frozen=True)
class PrepareReport:
    """Counts of a ``prepare_dataset`` run; ``failures`` lists every structure that failed."""

    source: str
    representation: str
    license: str
    split_rule: str
    split_counts: dict[str, int]
    split_failures: dict[str, int]
    failures_by_type: dict[str, int]
    property_columns: tuple[str, ...]
    shard_size: int
    num_shards: dict[str, int]
    failures: tuple[Failure, ...] = field(default_factory=tuple)

    @property
    def total_encoded(self) -> int:
        """Structures written over all splits."""
        return sum(self.split_counts.values())

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(asdict(self), indent=2)


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    """Hub-style shard name, e.g. ``train-00000-of-00004.parquet``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


def write_shards(table: datasets.Dataset, data_dir: Path, split: str, shard_size: int) -> int:
    """Write ``table`` as contiguous Parquet shards of at most ``shard_size`` rows; return the shard count."""
    num_shards = max(1, math.ceil(len(table) / shard_size))
    data_dir.mkdir(parents=True, exist_ok=True)
    for index in range(num_shards):
        shard = table.shard(num_shards=num_shards, index=index, contiguous=True)
        shard.to_parquet(str(data_dir / shard_file_name(split, index, num_shards)))
    return num_shards


def _assign_splits(table: datasets.Dataset, fractions: Sequence[float]) -> tuple[list[str], str]:
    """Split name per row, and the rule used (a given ``split`` column, or a hash of the id)."""
    if "split" in table.column_names:
        return [normalise_split_name(s) for s in table["split"]], "kept as given by the source's splits"
    rule = "SHA-256 of material_id, fractions train/validation/test = " + "/".join(f"{f:g}" for f in fractions)
    return [hash_split(mid, fractions) for mid in table["material_id"]], rule


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    *,
    representation: str = "wyckoff",
    tokenizer: Any = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_proc: int | None = None,
    options: EncodeOptions | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    license: str | None = None,
    limit: int | None = None,
) -> PrepareReport:
    """Encode every structure of ``source`` and write a sharded Parquet ``DatasetDict`` folder to ``out_dir``.

    Structures that fail to encode are counted by error type, listed in ``prepare_report.json`` and left
    out; they never stop the run. The folder has a dataset card (``README.md``) and loads with
    ``datasets.load_dataset(str(out_dir))`` or :func:`load_split`.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    table = read_source(source)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    if len(table) == 0:
        raise DataPreparationError(f"{source}: no rows")
    options = options or EncodeOptions()
    if options.text_conditions and representation not in TEXT_CONDITION_REPRESENTATIONS:
        raise ValueError(
            f"{representation} strings carry no condition prefix; train with data.crystal_system_condition / "
            "data.property_conditions instead of text conditions"
        )
    if options.cif_column not in table.column_names:
        raise DataPreparationError(f"{source}: no CIF column {options.cif_column!r}; columns are {table.column_names}")
    id_column = options.id_column or next((c for c in _ID_COLUMNS if c in table.column_names), None)
    property_columns = options.property_columns or default_property_columns(table, exclude=[id_column or ""])
    options = EncodeOptions(
        cif_column=options.cif_column,
        id_column=id_column,
        property_columns=tuple(property_columns),
        text_conditions=options.text_conditions,
        symprec=options.symprec,
    )
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(representation)
    keep = {"split"} & set(table.column_names)
    encoded = table.map(
        _encode_batch,
        batched=True,
        batch_size=64,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "options": options},
        remove_columns=[c for c in table.column_names if c not in keep],
        desc=f"encoding ({representation})",
        load_from_cache_file=False,  # the cache key ignores the code of encode_row: a stale report otherwise
    )
    split_names, split_rule = _assign_splits(encoded, split_fractions)
    encoded = encoded.remove_columns(list(keep)).add_column("split", split_names)
    report = _write_prepared(encoded, Path(out_dir), shard_size=shard_size)
    report = PrepareReport(
        source=str(source),
        representation=representation,
        license=license or source_license(source) or "unknown",
        split_rule=split_rule,
        property_columns=options.property_columns,
        shard_size=shard_size,
        **report,
    )
    _write_card_and_report(report, Path(out_dir), options.symprec)
    return report


def _write_prepared(encoded: datasets.Dataset, out_dir: Path, shard_size: int) -> dict[str, Any]:
    """Write the encoded rows per split; return counts and failures for the report."""
    errors = encoded.select_columns(["material_id", "split", "error_type", "error"]).to_pandas()
    failed = errors["error_type"] != ""
    failures = tuple(
        Failure(str(r.material_id), str(r.split), str(r.error_type), str(r.error)) for r in errors[failed].itertuples()
    )
    good = encoded.select(np.flatnonzero(~failed.to_numpy())).remove_columns(["error_type", "error"])
    ordered = [s for s in SPLITS if s in set(errors["split"])] + sorted(set(errors["split"]) - set(SPLITS))
    split_counts: dict[str, int] = {}
    num_shards: dict[str, int] = {}
    data_dir = out_dir / "data"
    for old in data_dir.glob("*.parquet") if data_dir.exists() else ():
        old.unlink()
    shutil.rmtree(out_dir / LOCAL_CACHE_DIR, ignore_errors=True)
    good_splits = good.to_pandas()["split"].to_numpy() if len(good) else np.array([], dtype=object)
    for split in ordered:
        part = good.select(np.flatnonzero(good_splits == split)).remove_columns(["split"])
        split_counts[split] = len(part)
        if len(part):
            num_shards[split] = write_shards(part, data_dir, split, shard_size)
    return {
        "split_counts": split_counts,
        "split_failures": dict(Counter(f.split for f in failures)),
        "failures_by_type": dict(Counter(f.error_type for f in failures)),
        "num_shards": num_shards,
        "failures": failures,
    }


def _write_card_and_report(report: PrepareReport, out_dir: Path, symprec: float) -> None:
    (out_dir / PREPARE_REPORT).write_text(report.to_json())
    info = DatasetCardInfo(
        pretty_name=f"{Path(report.source).stem or report.source} ({report.representation})",
        representation=report.representation,
        source=report.source,
        license=report.license,
        split_counts={k: v for k, v in report.split_counts.items() if k in report.num_shards},
        split_failures=report.split_failures,
        failures_by_type=report.failures_by_type,
        split_rule=report.split_rule,
        property_names=report.property_columns,
        symprec=symprec,
        repo_id=str(out_dir),
    )
    (out_dir / "README.md").write_text(render_dataset_card(info))


# --------------------------------------------------------------------------------------------------
# Loading and batching for training
# --------------------------------------------------------------------------------------------------


def load_split(
    source: str | Path, split: str, *, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a prepared dataset from a local folder or a Hub repo id (one code path for both).

    A local folder keeps its Arrow cache in ``<folder>/.cache``: ``datasets`` keys the cache of a local
    folder by its name and config only, so two folders with the same name would otherwise share (stale)
    rows. ``prepare_dataset`` clears that cache when it rewrites the folder.
    """
    local = Path(source)
    cache_dir = str(local / LOCAL_CACHE_DIR) if local.is_dir() else None
    return datasets.load_dataset(str(source), split=split, streaming=streaming, cache_dir=cache_dir)


def _rows(columns: Mapping[str, list]) -> list[dict[str, Any]]:
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def iter_epoch(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    shuffle_buffer: int = 10_000,
    skip_batches: int = 0,
) -> Iterator[list[dict[str, Any]]]:
    """Batches of rows of one epoch for one rank, in an order fixed by ``(seed, epoch)``.

    Map-style: a permutation from ``numpy.random.default_rng([seed, epoch])``, trimmed so that every
    rank gets the same number of rows, then strided over ranks. Streaming: a shard-aware shuffle with a
    ``shuffle_buffer`` (``IterableDataset.shuffle(seed).set_epoch(epoch)``), split over ranks with
    ``split_dataset_by_node``. ``skip_batches`` resumes inside the epoch (O(1) map-style, a re-read
    when streaming); both give the same batches as an uninterrupted pass.
    """
    if isinstance(dataset, datasets.IterableDataset):
        stream = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle else dataset
        stream.set_epoch(epoch)
        if world_size > 1:
            stream = datasets.distributed.split_dataset_by_node(stream, rank=rank, world_size=world_size)
        batches = _chunks(iter(stream), batch_size)
        yield from itertools.islice(batches, skip_batches, None)
        return
    n = len(dataset)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = order[: n - n % world_size][rank::world_size] if world_size > 1 else order
    for start in range(skip_batches * batch_size, len(mine), batch_size):
        yield _rows(dataset[mine[start : start + batch_size].tolist()])


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


@dataclass(frozen=True)
class CrystalCollator:
    """Rows of a prepared dataset -> a model batch (right-padded; labels are input ids with pads -> -100).

    Wyckoff tokenizers also return ``numeric_values``; it is passed through. ``crystal_system`` and
    ``property_names`` add the conditioning tensors of models that take conditions as inputs
    (MatterGPT): ``crystal_system`` (LongTensor, numbering of :data:`CRYSTAL_SYSTEMS`), ``properties``
    (FloatTensor, missing values 0) and ``property_mask`` (1 where a property is given).
    ``model_inputs`` drops what the model does not take (e.g. ``numeric_values`` for a plain GPT-2).
    """

    tokenizer: Any
    max_length: int | None = None
    crystal_system: bool = False
    property_names: tuple[str, ...] = ()
    text_column: str = TEXT_COLUMN
    model_inputs: frozenset[str] | None = None
    """Keyword arguments the model's ``forward`` accepts; other keys are dropped (``None`` keeps all)."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenize, pad and label one batch of rows."""
        encoded = self.tokenizer(
            [row[self.text_column] for row in rows],
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if "numeric_values" in encoded:
            batch["numeric_values"] = encoded["numeric_values"].float()
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        if self.crystal_system:
            batch["crystal_system"] = torch.tensor([CRYSTAL_SYSTEMS.index(row["crystal_system"]) for row in rows])
        if self.property_names:
            values = torch.tensor(
                [[_property(row, name) for name in self.property_names] for row in rows], dtype=torch.float32
            )
            mask = ~torch.isnan(values)
            batch["properties"] = torch.nan_to_num(values, nan=0.0)
            batch["property_mask"] = mask.float()
        if self.model_inputs is not None:
            batch = {k: v for k, v in batch.items() if k in self.model_inputs}
        return batch


def _property(row: Mapping[str, Any], name: str) -> float:
    value = (row.get("properties") or {}).get(name)
    return math.nan if value is None else float(value)
