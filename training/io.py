"""Reading and writing crystals: a folder of CIF files, one CIF file, or a CSV with a CIF column.

Bad items never stop a run: a CIF that does not parse, is disordered, holds a species that is not a
chemical element, or has a degenerate cell leaves ``None`` in its place, the error type name in ``errors``
and the reason in ``messages`` (``StructureSet.failures()`` lists them by id).

Oxidation states are not part of any token representation (both tokenizers encode elements), so
``parse_cif`` removes them by default: a CIF written with ``Na+``/``Cl-`` reads as ``Na``/``Cl`` and round
trips and matches compare elements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd
from pymatgen.core import Element, Structure

from crystal_tokenizers.errors import (
    CrystalEncodeError,
    DisorderedStructureError,
    InvalidStructureError,
    UnsupportedElementError,
)

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
    messages: tuple[str | None, ...] = ()
    """Why each failed item failed (None where it parsed); empty when not recorded."""

    def parsed(self) -> tuple[list[str], list[Structure]]:
        """Ids and structures of the items that parsed."""
        kept = [(i, s) for i, s in zip(self.ids, self.structures) if s is not None]
        return [i for i, _ in kept], [s for _, s in kept]

    def failures(self) -> list[dict[str, str]]:
        """One ``{"id", "error", "message"}`` per item that did not parse, in input order."""
        messages = self.messages or (None,) * len(self.ids)
        return [
            {"id": item, "error": error, "message": message or error}
            for item, error, message in zip(self.ids, self.errors, messages)
            if error is not None
        ]


MIN_CELL_VOLUME_A3 = 1e-6
"""A parsed cell at or under this volume (Å³) is degenerate (coplanar lattice vectors)."""


def _cif_reason(caught: Sequence[warnings.WarningMessage]) -> str:
    """pymatgen's own reason for a CIF it could not read (it warns the cause, then raises a bare error)."""
    for item in caught:
        text = str(item.message)
        if text.startswith("No structure parsed") and "\n" in text:
            return text.split("\n", 1)[1].strip()
    return ""


def parse_cif(text: str, keep_oxidation_states: bool = False) -> Structure:
    """Parse one ordered crystal of chemical elements from CIF text.

    Raises ``InvalidStructureError`` (empty text, unreadable CIF with pymatgen's reason, non-finite or
    zero-volume cell), ``DisorderedStructureError`` (partial occupancy) or ``UnsupportedElementError`` (a
    species such as ``Xx`` that is no element). Oxidation states are removed unless ``keep_oxidation_states``.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidStructureError("empty CIF text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structure = Structure.from_str(text, fmt="cif")
        except Exception as err:  # noqa: BLE001 - pymatgen raises many types for bad CIF text
            reason = _cif_reason(caught) or f"{type(err).__name__}: {err}"
            raise InvalidStructureError(f"CIF could not be parsed: {reason}") from err
    if not structure.is_ordered:
        raise DisorderedStructureError(f"{structure.formula}: partial occupancies")
    unknown = sorted({str(sp) for sp in structure.composition if not isinstance(sp, Element) and not
                      Element.is_valid_symbol(getattr(sp, "symbol", ""))})
    if unknown:
        raise UnsupportedElementError(f"{structure.formula}: species {unknown} are not chemical elements")
    if not all(math.isfinite(v) for v in (*structure.lattice.abc, *structure.lattice.angles)) or not all(
        math.isfinite(v) for v in structure.frac_coords.ravel()
    ):
        raise InvalidStructureError(f"{structure.formula}: non-finite lattice or coordinates")
    if not structure.volume > MIN_CELL_VOLUME_A3:
        raise InvalidStructureError(f"{structure.formula}: zero-volume cell ({structure.volume:.3g} Å³)")
    if not keep_oxidation_states:
        structure.remove_oxidation_states()
    return structure


def _parse_all(
    texts: Sequence[str], progress: ProgressFn
) -> tuple[list[Structure | None], list[str | None], list[str | None]]:
    structures: list[Structure | None] = []
    errors: list[str | None] = []
    messages: list[str | None] = []
    for text in progress(texts, desc="parse", total=len(texts)):
        try:
            structures.append(parse_cif(text))
            errors.append(None)
            messages.append(None)
        except CrystalEncodeError as err:
            structures.append(None)
            errors.append(type(err).__name__)
            messages.append(str(err))
    return structures, errors, messages


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
        structures, errors, messages = _parse_all([f.read_text(errors="replace") for f in files], progress)
        return StructureSet(tuple(f.stem for f in files), tuple(structures), tuple(errors), messages=tuple(messages))
    table = pd.read_csv(path, nrows=limit)
    if cif_column not in table.columns:
        raise ValueError(f"{path}: no column {cif_column!r} (columns: {', '.join(map(str, table.columns))})")
    texts = [text if isinstance(text, str) else "" for text in table[cif_column]]
    structures, errors, messages = _parse_all(texts, progress)
    ids = table[id_column].astype(str) if id_column in table.columns else pd.Series(range(len(table))).astype(str)
    columns = {
        str(name): tuple(None if pd.isna(v) else v for v in table[name]) for name in table.columns if name != cif_column
    }
    return StructureSet(tuple(ids), tuple(structures), tuple(errors), columns, tuple(messages))


def write_samples(out: str | Path, samples: Sequence[Any], crystal_system: str | None) -> Path:
    """``sample_NNNNN.cif`` per decoded sample and ``samples.csv`` for ``crystal-lm evaluate``; return the CSV.

    ``samples`` are ``training.sampling.GeneratedCrystal`` (``structure``, ``text``, ``space_group``).
    The CSV has one row per decoded sample: ``material_id`` (the file's stem), ``cif``, the sampled text,
    the ``spacegroup`` the text declares (Wyckoff models; empty for SLICES) and the ``crystal_system``
    condition, so that evaluate reports space-group consistency and crystal-system hit rate.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, crystal in enumerate(samples):
        if crystal.structure is None:
            continue
        name = f"sample_{index:05d}"
        cif = crystal.structure.to(filename=str(out / f"{name}.cif"))
        rows.append({"material_id": name, "cif": cif, "text": crystal.text,
                     "spacegroup": crystal.space_group, "crystal_system": crystal_system})
    columns = ["material_id", "cif", "text", "spacegroup", "crystal_system"]
    path = out / "samples.csv"
    pd.DataFrame(rows, columns=columns).astype({"spacegroup": "Int64"}).to_csv(path, index=False)
    return path
