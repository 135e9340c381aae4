"""Crystal inpainting: which elements fit masked sites, and repair of noisy coordinates, with a CrystalMLM.

A crystal is encoded with the Wyckoff tokenizer; element tokens of chosen orbits become ``<mask>``
(all orbits of one element, a random fraction, or given orbit indices) and, with ``noise`` σ̃ > 0, every
free coordinate is displaced by σ̃ × the shortest lattice edge (:mod:`crystal_tokenizers.wyckoff.masking`).
One forward pass of ``CrystalMLMForMaskedLM`` gives a species distribution at every masked orbit and a
clean value for every coordinate. The top-k completions are ranked by their joint probability under the
model: masking one element ties its orbits to one candidate element (score = Π over orbits); other
masks treat orbits as independent (the k best assignments, by beam search). With ``chemistry="soft"``
(the default) or ``"strict"`` a larger pool of model candidates is re-scored by what SMACT says of the
completed composition (charge neutrality with the unmasked part, oxidation states from SMACT's table,
Pauling electronegativity order, each orbit's Wyckoff multiplicity; :mod:`training.chemistry`);
``"none"`` is the plain model. Noised coordinates are replaced by the model's point
estimates. Orbits are indexed 0.. in the order of the encoded sequence.
"""

from __future__ import annotations

from crystal_tokenizers.loading import load_tokenizer

import heapq
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError
from crystal_tokenizers.wyckoff.masking import corrupt, element_positions, orbits_of_species, random_orbits
from training.chemistry import DEFAULT_MODE, DEFAULT_PRIOR_WEIGHT, MaskContext, Ranker, ranker_for_mode

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


class InpaintError(ValueError):
    """An inpainting request is inconsistent (no mask given, an element not in the crystal, bad orbit indices)."""


@dataclass(frozen=True)
class InpaintRequest:
    """One crystal to complete: its token text, the orbits to mask, the noise σ̃ and whether masked orbits share one element."""

    text: str
    masked_orbits: tuple[int, ...]
    noise: float = 0.0
    tied: bool = False


@dataclass(frozen=True)
class Completion:
    """One completed crystal: the structure, its token text, its ranking score as a probability and the chosen elements.

    ``probability`` is the model's joint probability of the chosen elements, times e^−penalty with a
    chemistry mode (:class:`training.chemistry.ChemistryPenalty`): completions come best first by it.
    """

    structure: Structure
    text: str
    probability: float
    species: tuple[str, ...]
    """The element placed on each masked orbit, in orbit order."""


@dataclass(frozen=True)
class InpaintResult:
    """The completions of one crystal (best first), or the reason there are none."""

    name: str
    masked_orbits: tuple[int, ...] = ()
    original_species: tuple[str, ...] = ()
    completions: tuple[Completion, ...] = ()
    error: str | None = None
    failed_completions: int = 0
    """Candidates that did not decode to a structure (e.g. predicted coordinates collapsing an orbit)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (structures as reduced formulas)."""
        return {
            "name": self.name,
            "masked_orbits": list(self.masked_orbits),
            "original_species": list(self.original_species),
            "error": self.error,
            "failed_completions": self.failed_completions,
            "completions": [
                {"rank": rank, "probability": c.probability, "species": list(c.species),
                 "formula": c.structure.composition.reduced_formula, "text": c.text}
                for rank, c in enumerate(self.completions, start=1)
            ],
        }


# --------------------------------------------------------------------------------------------------
# Choosing candidates
# --------------------------------------------------------------------------------------------------


def tied_candidates(log_probs: np.ndarray, candidate_ids: np.ndarray, top_k: int) -> list[tuple[float, tuple[int, ...]]]:
    """Best ``top_k`` single elements for all masked orbits at once: (joint log-probability, ids), best first.

    ``log_probs`` (n_orbits, n_candidates) are the per-orbit log-probabilities of ``candidate_ids``.
    """
    joint = log_probs.sum(axis=0)
    best = np.argsort(-joint)[:top_k]
    return [(float(joint[j]), (int(candidate_ids[j]),) * log_probs.shape[0]) for j in best]


def independent_candidates(log_probs: np.ndarray, candidate_ids: np.ndarray, top_k: int) -> list[tuple[float, tuple[int, ...]]]:
    """The ``top_k`` most probable assignments of independent orbits (beam search, exact for a product)."""
    beam: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for row in log_probs:
        best = np.argsort(-row)[:top_k]
        expanded = [(score + float(row[j]), ids + (int(candidate_ids[j]),)) for score, ids in beam for j in best]
        beam = heapq.nlargest(top_k, expanded, key=lambda item: item[0])
    return beam


# --------------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------------


def _damaged_inputs(request: InpaintRequest, tokenizer: Any, rng: np.random.Generator) -> tuple[list[int], np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Ids and values of the damaged crystal, the masked token positions and the noised value positions."""
    encoded = tokenizer(request.text)
    ids = list(encoded["input_ids"])
    values = np.asarray(encoded["numeric_values"], dtype=float)
    damaged = corrupt(tokenizer.convert_ids_to_tokens(ids), values, rng, masked_orbits=request.masked_orbits, noise_scale=request.noise)
    for position in damaged.masked_positions:
        ids[position] = tokenizer.mask_token_id
    return ids, damaged.values, damaged.masked_positions, damaged.noised_positions


@torch.no_grad()
def inpaint_requests(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[InpaintRequest],
    *,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    names: Sequence[str] | None = None,
    chemistry: str = DEFAULT_MODE,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
    ranker: Ranker | None = None,
) -> list[InpaintResult]:
    """Complete every request (batched forward passes); one :class:`InpaintResult` per request.

    ``chemistry`` (``none``/``soft``/``strict``) re-scores the model's candidates with SMACT, and in the
    chemistry modes ``prior_weight`` × the co-occurrence log-prior of the tokenizer's training element
    statistics (when it has them) joins the model's log-probabilities; ``ranker`` replaces the ranking
    altogether (see :mod:`training.chemistry`; the baselines of the benchmark use it).
    """
    ranker = ranker or ranker_for_mode(chemistry, getattr(tokenizer, "element_statistics", None), prior_weight)
    if top_k < 1:
        raise InpaintError(f"top_k must be >= 1, got {top_k}")
    rng = np.random.default_rng(seed)
    names = list(names) if names is not None else [f"crystal_{i}" for i in range(len(requests))]
    model.eval()
    device = next(model.parameters()).device
    element_ids = np.asarray(model.config.element_token_ids)
    results: list[InpaintResult] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        damaged = [_damaged_inputs(request, tokenizer, rng) for request in chunk]
        length = max(len(ids) for ids, *_ in damaged)
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        values = torch.full((len(chunk), length), math.nan)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (ids, vals, _, _) in enumerate(damaged):
            input_ids[row, :len(ids)] = torch.as_tensor(ids)
            values[row, :len(ids)] = torch.as_tensor(vals, dtype=torch.float32)
            attention[row, :len(ids)] = 1
        output = model(input_ids=input_ids.to(device), numeric_values=values.to(device), attention_mask=attention.to(device))
        log_probs = torch.log_softmax(output.logits.float(), dim=-1)[..., element_ids].cpu().numpy()
        predicted = output.predicted_values.float().cpu().numpy()
        for row, (request, (ids, vals, masked, noised)) in enumerate(zip(chunk, damaged)):
            results.append(_complete(
                names[start + row], request, tokenizer, ids, vals, masked, noised,
                log_probs[row], predicted[row], element_ids, top_k, ranker,
            ))
    return results


def _complete(
    name: str, request: InpaintRequest, tokenizer: Any, ids: list[int], values: np.ndarray,
    masked: tuple[int, ...], noised: tuple[int, ...], log_probs: np.ndarray, predicted: np.ndarray,
    element_ids: np.ndarray, top_k: int, ranker: Ranker,
) -> InpaintResult:
    """Rank candidates for one crystal and decode each to a structure."""
    original = tokenizer.convert_ids_to_tokens(tokenizer(request.text)["input_ids"])
    original_species = tuple(original[p] for p in masked)
    values = values.copy()
    if noised:
        values[list(noised)] = predicted[list(noised)]
    site_log_probs = log_probs[list(masked)]
    elements = tokenizer.convert_ids_to_tokens([int(i) for i in element_ids])
    context = MaskContext(tuple(tokenizer.convert_ids_to_tokens(ids)), tuple(masked), request.tied)
    ranked = ranker(context, site_log_probs, elements, top_k) if masked else [(0.0, ())]
    candidates = [(score, tuple(tokenizer.convert_tokens_to_ids(list(species)))) for score, species in ranked]
    completions: list[Completion] = []
    failed = 0
    for score, chosen in candidates:
        filled = list(ids)
        for position, token_id in zip(masked, chosen):
            filled[position] = token_id
        try:
            structure = tokenizer.decode_structure(filled, values)
        except CrystalDecodeError as err:
            logger.debug("%s: candidate %s does not decode: %s", name, chosen, err)
            failed += 1
            continue
        completions.append(Completion(
            structure=structure, text=tokenizer.ids_to_text(filled, values), probability=math.exp(score),
            species=tuple(tokenizer.convert_ids_to_tokens(list(chosen))),
        ))
    return InpaintResult(
        name=name, masked_orbits=request.masked_orbits, original_species=original_species,
        completions=tuple(completions), failed_completions=failed,
    )


# --------------------------------------------------------------------------------------------------
# The user-facing function
# --------------------------------------------------------------------------------------------------


def plan_request(
    text: str,
    tokenizer: Any,
    *,
    mask_element: str | None = None,
    mask_fraction: float | None = None,
    mask_sites: Sequence[int] | None = None,
    noise: float = 0.0,
    rng: np.random.Generator,
) -> InpaintRequest:
    """The request for one crystal text from exactly one of the three mask options."""
    given = [option is not None for option in (mask_element, mask_fraction, mask_sites)]
    if sum(given) != 1:
        raise InpaintError("give exactly one of mask_element, mask_fraction, mask_sites")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    num_orbits = len(element_positions(tokens))
    if mask_element is not None:
        orbits = orbits_of_species(tokens, mask_element)
        if not orbits:
            present = sorted({tokens[i] for i in element_positions(tokens)})
            raise InpaintError(f"element {mask_element} is not in the crystal (elements: {present})")
        return InpaintRequest(text, tuple(orbits), noise, tied=True)
    if mask_fraction is not None:
        if not 0.0 < mask_fraction <= 1.0:
            raise InpaintError(f"mask_fraction must lie in (0, 1], got {mask_fraction}")
        return InpaintRequest(text, tuple(random_orbits(num_orbits, mask_fraction, rng)), noise)
    bad = [i for i in mask_sites if not 0 <= i < num_orbits]
    if bad:
        raise InpaintError(f"orbit indices {bad} out of range: the crystal has {num_orbits} orbits (0-{num_orbits - 1})")
    return InpaintRequest(text, tuple(sorted(set(mask_sites))), noise)


def inpaint(
    structures: Sequence[Structure],
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    mask_element: str | None = None,
    mask_fraction: float | None = None,
    mask_sites: Sequence[int] | None = None,
    noise: float = 0.0,
    top_k: int = 5,
    seed: int = 0,
    names: Sequence[str] | None = None,
    chemistry: str = DEFAULT_MODE,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
) -> list[InpaintResult]:
    """Top-k completions of each structure after masking (exactly one mask option) and optional noise σ̃.

    ``chemistry``: ``soft`` (model log-probability minus SMACT penalties), ``strict`` (SMACT-valid
    first) or ``none`` (the plain model); see :mod:`training.chemistry`. ``prior_weight``: weight of the
    co-occurrence prior from the tokenizer's training element statistics in the chemistry modes (0: off;
    a tokenizer without statistics has none). A structure that cannot be encoded, or lacks the element
    to mask, gets a result with ``error`` set.
    """
    rng = np.random.default_rng(seed)
    names = list(names) if names is not None else [f"{i}_{s.composition.reduced_formula}" for i, s in enumerate(structures)]
    planned: list[tuple[int, InpaintRequest]] = []
    results: dict[int, InpaintResult] = {}
    for index, (name, structure) in enumerate(zip(names, structures)):
        try:
            text = tokenizer.structure_to_string(structure)
            planned.append((index, plan_request(
                text, tokenizer, mask_element=mask_element, mask_fraction=mask_fraction,
                mask_sites=mask_sites, noise=noise, rng=rng,
            )))
        except (CrystalEncodeError, InpaintError) as err:
            results[index] = InpaintResult(name=name, error=f"{type(err).__name__}: {err}")
    completed = inpaint_requests(
        model, tokenizer, [request for _, request in planned], top_k=top_k, seed=seed,
        names=[names[index] for index, _ in planned], chemistry=chemistry, prior_weight=prior_weight,
    )
    results.update({index: result for (index, _), result in zip(planned, completed)})
    return [results[index] for index in range(len(structures))]


_FILL_MASK_FLOOR = 1e-6
"""Probability given to an element missing from one mask's candidate list (it was in another's)."""


def chemistry_fill_mask(text: str, answers: Sequence[Any], top_k: int = 5, tied: bool = False,
                        strict: bool = False, statistics: Any = None,
                        prior_weight: float = DEFAULT_PRIOR_WEIGHT) -> list[dict[str, Any]]:
    """Joint completions of a ``fill-mask`` pipeline's answers, re-scored by SMACT (soft penalties, or valid first).

    ``text`` is the masked token text given to ``pipeline("fill-mask", ...)`` and ``answers`` its output
    (one candidate list per ``<mask>``, as for ``top_k`` > 1; a single mask's flat list is accepted). Each
    mask's candidates are the pool; joint assignments are ranked by the product of the pipeline's scores
    minus the SMACT penalties of the completed composition (orbit multiplicities from the text;
    ``strict``: SMACT-valid completions first). ``statistics`` (the pipeline tokenizer's
    ``element_statistics``) adds ``prior_weight`` × the co-occurrence log-prior to every mask's scores.
    A tied mask takes an element absent from the rest. Returns ``{"species", "score", "charge_neutral",
    "sequence"}`` dicts, best first.
    """
    from training.chemistry import (DEFAULT_PENALTY, STRICT_PENALTY, chemistry_rerank, completed_counts,
                                    cooccurrence_log_prior, is_charge_neutral, model_pool)

    words = text.split()
    masked = tuple(i for i, w in enumerate(words) if w == "<mask>")
    if not masked:
        raise InpaintError("the text has no <mask> token")
    per_site = [answers] if answers and isinstance(answers[0], dict) else list(answers)
    if len(per_site) != len(masked):
        raise InpaintError(f"{len(per_site)} answer lists for {len(masked)} masked sites")
    elements = sorted({c["token_str"].strip() for site in per_site for c in site})
    log_probs = np.full((len(masked), len(elements)), math.log(_FILL_MASK_FLOOR))
    for row, site in enumerate(per_site):
        for candidate in site:
            log_probs[row, elements.index(candidate["token_str"].strip())] = math.log(max(candidate["score"], 1e-300))
    context = MaskContext(tuple(words), masked, tied)
    if statistics is not None and prior_weight:
        log_probs = log_probs + prior_weight * cooccurrence_log_prior(statistics.frequency, statistics.pairs)(context, elements)
    width = max(top_k, 64)
    penalty = STRICT_PENALTY if strict else DEFAULT_PENALTY
    ranked = chemistry_rerank(context, model_pool(context, log_probs, elements, width, exclude_present=tied), penalty)[:top_k]
    out = []
    for score, species in ranked:
        filled = list(words)
        for position, element in zip(masked, species):
            filled[position] = element
        out.append({"species": list(species), "score": math.exp(score),
                    "charge_neutral": is_charge_neutral(completed_counts(context, species)), "sequence": " ".join(filled)})
    return out


def read_structures_file(path: str | Path) -> tuple[list[str], list[Structure]]:
    """Names and structures from a CIF file, a folder of CIFs or a CSV with a ``cif`` column."""
    import pandas as pd

    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Issues encountered while parsing CIF")
        if path.is_dir():
            files = sorted(path.glob("*.cif"))
            return [f.stem for f in files], [Structure.from_file(str(f)) for f in files]
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path)
            if "cif" not in table.columns:
                raise InpaintError(f"{path}: no 'cif' column; columns are {list(table.columns)}")
            names = [str(n) for n in table["material_id"]] if "material_id" in table.columns else [f"row_{i}" for i in range(len(table))]
            return names, [Structure.from_str(text, fmt="cif") for text in table["cif"]]
        return [path.stem], [Structure.from_file(str(path))]


def load_inpainting_model(model_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """A saved CrystalMLM masked model and its tokenizer (``trust_remote_code``)."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(model_dir), trust_remote_code=True)
    tokenizer = load_tokenizer(str(model_dir))
    return model, tokenizer


def write_results(results: Sequence[InpaintResult], out_dir: str | Path) -> list[Path]:
    """Write ``<name>/rank<k>_<formula>.cif`` per completion and ``inpaint.json``; returns the CIF paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for result in results:
        for rank, completion in enumerate(result.completions, start=1):
            folder = out / _safe_name(result.name)
            folder.mkdir(exist_ok=True)
            path = folder / f"rank{rank}_{completion.structure.composition.reduced_formula}.cif"
            completion.structure.to(filename=str(path))
            written.append(path)
    (out / "inpaint.json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return written


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "crystal"


@dataclass(frozen=True)
class InpaintFileReport:
    """What :func:`inpaint_file` did: the results and the CIFs written."""

    results: list[InpaintResult]
    written: list[Path] = field(default_factory=list)


def inpaint_file(
    source: str | Path,
    model_dir: str | Path,
    *,
    mask_element: str | None = None,
    mask_fraction: float | None = None,
    mask_sites: Sequence[int] | None = None,
    noise: float = 0.0,
    top_k: int = 5,
    out_dir: str | Path | None = None,
    seed: int = 0,
    chemistry: str = DEFAULT_MODE,
    prior_weight: float = DEFAULT_PRIOR_WEIGHT,
) -> InpaintFileReport:
    """``crystal-lm inpaint`` as a function: read structures, complete them, write CIFs + JSON to ``out_dir``."""
    names, structures = read_structures_file(source)
    model, tokenizer = load_inpainting_model(model_dir)
    results = inpaint(
        structures, model, tokenizer, mask_element=mask_element, mask_fraction=mask_fraction,
        mask_sites=mask_sites, noise=noise, top_k=top_k, seed=seed, names=names, chemistry=chemistry,
        prior_weight=prior_weight,
    )
    written = write_results(results, out_dir) if out_dir is not None else []
    return InpaintFileReport(results=results, written=written)


__all__ = [
    "Completion",
    "chemistry_fill_mask",
    "InpaintError",
    "InpaintFileReport",
    "InpaintRequest",
    "InpaintResult",
    "independent_candidates",
    "inpaint",
    "inpaint_file",
    "inpaint_requests",
    "load_inpainting_model",
    "plan_request",
    "read_structures_file",
    "tied_candidates",
    "write_results",
]
