"""Reading crystals for the command line: CSV files with a CIF column, or folders of CIF files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pymatgen.core import Structure


@dataclass
class LoadedStructures:
    """Structures read from a file or folder, with their ids, table rows and per-item parse errors."""

    ids: list[str]
    structures: list[Structure]
    table: pd.DataFrame
    parse_errors: dict[str, str]


def structure_from_cif(text: str) -> Structure:
    """Parse one CIF text (the first structure in it), silencing pymatgen's CIF warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(text, fmt="cif")


def read_structures(path: str | Path, cif_column: str = "cif", id_column: str = "material_id",
                    limit: int | None = None) -> LoadedStructures:
    """Read a CSV with a CIF column, or every ``*.cif`` in a folder; unparsable CIFs are listed, not raised."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.cif"))[:limit]
        table = pd.DataFrame({id_column: [f.stem for f in files], cif_column: [f.read_text() for f in files]})
    else:
        table = pd.read_csv(path, nrows=limit)
        if cif_column not in table.columns:
            raise ValueError(f"{path} has no column {cif_column!r} (columns: {list(table.columns)})")
        if id_column not in table.columns:
            table[id_column] = [str(i) for i in range(len(table))]
    ids: list[str] = []
    structures: list[Structure] = []
    rows: list[int] = []
    parse_errors: dict[str, str] = {}
    for row, (item_id, cif) in enumerate(zip(table[id_column].astype(str), table[cif_column])):
        try:
            structures.append(structure_from_cif(str(cif)))
            ids.append(item_id)
            rows.append(row)
        except Exception as err:  # pymatgen raises many types for bad CIFs; record, never stop the run
            parse_errors[item_id] = f"{type(err).__name__}: {err}"
    return LoadedStructures(ids=ids, structures=structures, table=table.iloc[rows].reset_index(drop=True),
                            parse_errors=parse_errors)
