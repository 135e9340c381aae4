"""Shared fixtures: the bundled MP-20 sample and the optional shared data folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from training.io import parse_cif

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def requires_shared(relative: str) -> pytest.MarkDecorator:
    """Skip marker for a test that reads ``../shared/data/<relative>``, active only when the file is absent."""
    path = SHARED_DATA / relative
    return pytest.mark.skipif(
        not path.exists(), reason=f"{path} is absent: this check needs crystal-lm's shared data folder next to the project"
    )


@pytest.fixture(scope="session")
def sample_table() -> pd.DataFrame:
    """The bundled 600-crystal MP-20 sample shipped inside the package."""
    with resources.as_file(resources.files("crystal_tokenizers").joinpath("data", "mp20_sample.csv")) as path:
        return pd.read_csv(path)


@pytest.fixture(scope="session")
def sample_structures(sample_table):
    """The first 150 crystals of the bundled sample as pymatgen Structures."""
    return [parse_cif(cif) for cif in sample_table.cif[:150]]
