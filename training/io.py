"""Reading crystals: a folder of CIF files, one CIF file, or a CSV with a CIF column.

Bad items never stop a run: a CIF that does not parse (or is disordered) leaves ``None`` in its place and
the error type name in ``errors``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd
from pymatgen.core import Structure

from crystal_tokenizers.errors import DisorderedStructureError

_T = TypeVar("_T")


class ProgressFn(Protocol):
    """Wraps an iterable to report progress (``functools.partial(tqdm, file=sys.stderr)`` fits)."""

    def __call__(self, iterable: Iterable[_T], *, desc: str, total: int) -> Iterable[_T]: ...


def no_progress(iterable: Iterable[_T], *, desc: str, total: int) -> Iterable[_T]:
    """A ``ProgressFn`` that reports nothing."""
    return iterable


@dataclass(frozen=True)
class StructureSet:
    """Structures read from a CIF folder or CSV; ``structures[i]`` is None where ``errors[i]`` says why."""

    ids: tuple[str, ...]
    structures: tuple[Structure | None, ...]
    errors: tuple[str | None, ...]
    columns: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def parsed(self) -> tuple[list[str], list[Structure]]:
        """Ids and structures of the items that parsed."""
        kept = [(i, s) for i, s in zip(self.ids, self.structures) if s is not None]
        return [i for i, _ in kept], [s for _, s in kept]


def parse_cif(text: str) -> Structure:
    """Parse one ordered crystal from CIF text; raise ``DisorderedStructureError`` for partial occupancy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure = Structure.from_str(text, fmt="cif")
    if not structure.is_ordered:
        raise DisorderedStructureError(f"{structure.formula}: partial occupancies")
    return structure


def _parse_all(texts: Sequence[str], progress: ProgressFn) -> tuple[list[Structure | None], list[str | None]]:
    structures: list[Structure | None] = []
    errors: list[str | None] = []
    for text in progress(texts, desc="parse", total=len(texts)):
        try:
            structures.append(parse_cif(text))
            errors.append(None)
        except Exception as err:  # noqa: BLE001 - any parser failure is one bad item, counted by type
            structures.append(None)
            errors.append(type(err).__name__)
    return structures, errors


def read_structures(
    path: str | Path,
    cif_column: str = "cif",
    id_column: str = "material_id",
    limit: int | None = None,
    progress: ProgressFn | None = None,
) -> StructureSet:
    """Read a folder of ``*.cif`` files, one CIF file, or a CSV with a CIF column (the first ``limit`` items).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a CSV without ``cif_column``.
    """
    path = Path(path)
    progress = progress or no_progress
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such CIF folder or CSV file")
    if path.is_dir() or path.suffix.lower() == ".cif":
        files = (sorted(path.glob("*.cif")) if path.is_dir() else [path])[:limit]
        structures, errors = _parse_all([f.read_text(errors="replace") for f in files], progress)
        return StructureSet(tuple(f.stem for f in files), tuple(structures), tuple(errors))
    table = pd.read_csv(path, nrows=limit)
    if cif_column not in table.columns:
        raise ValueError(f"{path}: no column {cif_column!r} (columns: {', '.join(map(str, table.columns))})")
    texts = [text if isinstance(text, str) else "" for text in table[cif_column]]
    structures, errors = _parse_all(texts, progress)
    ids = table[id_column].astype(str) if id_column in table.columns else pd.Series(range(len(table))).astype(str)
    columns = {
        str(name): tuple(None if pd.isna(v) else v for v in table[name]) for name in table.columns if name != cif_column
    }
    return StructureSet(tuple(ids), tuple(structures), tuple(errors), columns)
