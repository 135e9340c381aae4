"""Predictor-ranked sampling and generation strategies for partial conditions (after Con-CDVAE).

Ranked sampling (Con-CDVAE generates 20,000 candidates and keeps the 200 a predictor ranks best):
:func:`generate_ranked` asks ``sample_fn`` for candidates batch by batch, scores each batch with
``predictor``, appends every candidate to ``candidates.csv`` as it comes, and keeps the ``keep``
candidates whose prediction is closest to ``target`` in a bounded heap; memory holds one batch plus
``keep`` candidates whatever ``n`` is. A candidate is a pymatgen ``Structure`` (written as CIF) or a token
string; ``None`` marks a sample that did not decode (counted, never kept).

Condition strategies (Con-CDVAE's default / full / partial, "D/F/L"): ``"default"`` generates without
conditions, ``"full"`` with every condition given, ``"partial"`` with some given and the rest drawn from
the training distribution conditioned on them (:func:`draw_conditions`, a k-nearest-neighbour draw).
"""

from __future__ import annotations

import csv
import heapq
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pymatgen.core import Structure

logger = logging.getLogger(__name__)

CANDIDATES_CSV = "candidates.csv"
KEPT_CSV = "kept.csv"
KEPT_CIF_DIR = "kept"
STRATEGIES: tuple[str, ...] = ("default", "full", "partial")
DEFAULT_NEIGHBOURS = 16
"""Training rows the partial strategy draws from (the k nearest to the given conditions)."""

Candidate = Structure | str | None
SampleFn = Callable[[int], Sequence[Candidate]]
"""``sample_fn(size)`` returns ``size`` candidates (``None`` where a sample did not decode)."""
Predictor = Callable[[Sequence[Any]], np.ndarray]
"""``predictor(candidates)`` returns one value per candidate (property units; NaN = cannot predict)."""
Progress = Callable[[Iterable[int], int], Iterable[int]]
"""``progress(batch_sizes, total)`` wraps the batch iterator (e.g. with tqdm on stderr in the CLI)."""


class ConditionError(ValueError):
    """Conditions that cannot be used: an unknown name, a strategy without what it needs, no matching row."""


@dataclass(frozen=True)
class RankedCandidate:
    """One kept candidate: its sample index, predicted value and distance to the target (property units)."""

    index: int
    predicted: float
    deviation: float
    candidate: Structure | str


@dataclass(frozen=True)
class RankingResult:
    """The kept candidates (closest first) and what the run saw."""

    kept: tuple[RankedCandidate, ...]
    sampled: int
    decoded: int
    scored: int
    out_dir: Path


def _no_progress(iterable: Iterable[int], total: int) -> Iterable[int]:
    return iterable


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches that together give ``n`` samples."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _describe(candidate: Candidate) -> dict[str, str]:
    """CSV fields of a candidate: formula + CIF for a Structure, the text for a token string."""
    if isinstance(candidate, Structure):
        return {"formula": candidate.composition.reduced_formula, "text": "", "cif": candidate.to(fmt="cif")}
    return {"formula": "", "text": candidate or "", "cif": ""}


def _write_kept(kept: Sequence[RankedCandidate], out_dir: Path) -> None:
    """``kept.csv`` (rank order) and one CIF per kept Structure under ``kept/``."""
    cif_dir = out_dir / KEPT_CIF_DIR
    with (out_dir / KEPT_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["rank", "index", "predicted", "deviation", "formula", "text", "cif"])
        writer.writeheader()
        for rank, item in enumerate(kept):
            fields = _describe(item.candidate)
            writer.writerow({"rank": rank, "index": item.index, "predicted": item.predicted,
                             "deviation": item.deviation, **fields})
            if fields["cif"]:
                cif_dir.mkdir(exist_ok=True)
                (cif_dir / f"rank_{rank:05d}.cif").write_text(fields["cif"])


def generate_ranked(
    sample_fn: SampleFn,
    predictor: Predictor,
    n: int,
    keep: int,
    target: float,
    batch_size: int,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> RankingResult:
    """Sample ``n`` candidates in batches and keep the ``keep`` whose prediction is closest to ``target``.

    Every candidate is appended to ``out_dir/candidates.csv`` (index, decoded, predicted, deviation,
    formula, text, cif) as its batch finishes; the kept ones go to ``kept.csv`` and ``kept/rank_*.cif``.
    Ties in deviation keep the earlier sample.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = _batch_sizes(n, batch_size)
    heap: list[tuple[float, int, int, Structure | str, float]] = []  # (-deviation, -index, index, candidate, value)
    index = decoded = scored = 0
    with (out_dir / CANDIDATES_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["index", "decoded", "predicted", "deviation", "formula", "text", "cif"])
        writer.writeheader()
        for size in (progress or _no_progress)(sizes, len(sizes)):
            batch = list(sample_fn(size))
            if len(batch) != size:
                raise ValueError(f"sample_fn returned {len(batch)} candidates for a batch of {size}")
            present = [i for i, c in enumerate(batch) if c is not None]
            values = np.full(size, np.nan)
            if present:
                values[present] = np.asarray(predictor([batch[i] for i in present]), dtype=float)
            for candidate, value in zip(batch, values, strict=True):
                deviation = abs(float(value) - target)
                writer.writerow({"index": index, "decoded": candidate is not None, "predicted": value,
                                 "deviation": deviation, **_describe(candidate)})
                if candidate is not None and math.isfinite(deviation):
                    scored += 1
                    item = (-deviation, -index, index, candidate, float(value))
                    if len(heap) < keep:
                        heapq.heappush(heap, item)
                    else:
                        heapq.heappushpop(heap, item)
                decoded += candidate is not None
                index += 1
            handle.flush()
    kept = tuple(
        RankedCandidate(index=i, predicted=value, deviation=-neg_dev, candidate=candidate)
        for neg_dev, _, i, candidate, value in sorted(heap, key=lambda item: (-item[0], item[2]))
    )
    _write_kept(kept, out_dir)
    logger.info("kept %d of %d candidates (%d decoded, %d scored)", len(kept), index, decoded, scored)
    return RankingResult(kept=kept, sampled=index, decoded=decoded, scored=scored, out_dir=out_dir)


# ------------------------------------------------------------------------------------- conditions


def _is_categorical(column: pd.Series) -> bool:
    """Categorical conditions (crystal system, space group) are the non-float columns."""
    return not pd.api.types.is_float_dtype(column)


def draw_conditions(
    given: Mapping[str, Any],
    training_table: pd.DataFrame,
    rng: np.random.Generator,
    *,
    columns: Sequence[str] | None = None,
    k: int = DEFAULT_NEIGHBOURS,
) -> dict[str, Any]:
    """The ``given`` conditions plus the missing ``columns`` drawn from training rows that fit them.

    Rows must equal every given categorical value (non-float column) and are ranked by the distance
    between their float columns and the given ones, each in units of that column's standard deviation
    over the table; one of the ``k`` nearest is drawn uniformly and supplies the missing values. This is
    a k-nearest-neighbour sample of p(missing | given) from the empirical training distribution.
    """
    columns = list(columns if columns is not None else training_table.columns)
    unknown = sorted(set(given) - set(columns))
    if unknown:
        raise ConditionError(f"unknown condition(s) {unknown}; the table offers {columns}")
    rows = training_table[columns].dropna()
    for name, value in given.items():
        if _is_categorical(rows[name]):
            rows = rows[rows[name] == value]
            if rows.empty:
                raise ConditionError(f"no training row has {name} = {value!r} (with the other given conditions)")
    numeric = [name for name in given if not _is_categorical(training_table[name])]
    if numeric:
        scale = training_table[numeric].std().replace(0.0, 1.0).fillna(1.0).to_numpy(dtype=float)
        wanted = np.array([float(given[name]) for name in numeric])
        distance = np.sqrt((((rows[numeric].to_numpy(dtype=float) - wanted) / scale) ** 2).sum(axis=1))
        rows = rows.iloc[np.argsort(distance, kind="stable")[:k]]
    else:
        rows = rows.iloc[rng.permutation(len(rows))[:k]]
    drawn = rows.iloc[int(rng.integers(len(rows)))]
    return {name: given[name] if name in given else _plain(drawn[name]) for name in columns}


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (JSON- and torch-friendly)."""
    return value.item() if isinstance(value, np.generic) else value


def conditions_for_strategy(
    strategy: str,
    given: Mapping[str, Any],
    training_table: pd.DataFrame,
    rng: np.random.Generator,
    *,
    columns: Sequence[str] | None = None,
    k: int = DEFAULT_NEIGHBOURS,
) -> dict[str, Any]:
    """Conditions for one sample: ``{}`` (default), ``given`` checked complete (full), or ``given`` + drawn (partial)."""
    columns = list(columns if columns is not None else training_table.columns)
    if strategy == "default":
        if given:
            raise ConditionError(f"the default strategy takes no conditions, got {sorted(given)}")
        return {}
    if strategy == "full":
        missing = [name for name in columns if name not in given]
        if missing:
            raise ConditionError(f"the full strategy needs every condition; missing {missing}")
        return {name: given[name] for name in columns}
    if strategy == "partial":
        return draw_conditions(given, training_table, rng, columns=columns, k=k)
    raise ConditionError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


__all__ = [
    "STRATEGIES",
    "ConditionError",
    "RankedCandidate",
    "RankingResult",
    "conditions_for_strategy",
    "draw_conditions",
    "generate_ranked",
]
