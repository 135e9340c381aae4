"""Sampling crystals: batched grammar-constrained generation from a Wyckoff model or a MatterGPT, and CSP.

``generate_crystals`` (WyckoffGPT, conditions as prompt text) and ``generate_graph_crystals`` (MatterGPT
on SLICES(-PLUS) strings, conditions as ``generate`` keyword arguments) run ``model.generate`` in
batches (grammar on by default) and decode every sample to a ``Structure`` or the reason it is not one. ``predict_structures`` is crystal-structure
prediction (CSP) as in DiffCSP++ / Uni-MDM: prompt with a crystal's composition (and with ``template``
its space group and occupied Wyckoff orbits), sample k completions and compare them with the true
structure using ``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)``; a crystal is matched when any
of its k samples matches, and its RMSE is the smallest normalised RMS displacement among them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError
from crystal_tokenizers.wyckoff import codec
from crystal_tokenizers.wyckoff.grammar import (
    DEFAULT_MAX_ATOMS,
    DEFAULT_MAX_ORBITS,
    MAX_ORBIT_TOKENS,
)
from crystal_tokenizers.crystal_systems import CRYSTAL_SYSTEMS

logger = logging.getLogger(__name__)

SYMMETRY_MODES = ("graph", "group")
"""MatterGPT symmetry modes of ``generate_graph_crystals``: graph-consistent operations, or a written group imposed."""
CSP_MATCHER_SETTINGS = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}
"""StructureMatcher tolerances of the CSP protocol (DiffCSP, DiffCSP++, Uni-MDM)."""
_T = TypeVar("_T")
Progress = Callable[[Iterable[_T], int], Iterable[_T]]
"""``progress(iterable, total)`` wraps an iterable (e.g. with tqdm); the default returns it unchanged."""


def _no_progress(iterable: Iterable[_T], total: int) -> Iterable[_T]:
    return iterable


@dataclass(frozen=True)
class GeneratedCrystal:
    """One sample: its prompt, decoded text (values written out), and the structure or the decode error."""

    prompt: str
    text: str
    structure: Structure | None
    error: str | None

    @property
    def space_group(self) -> int | None:
        """The sampled ``sg:N`` of the body, if any."""
        body = self.text.split(codec.SEP, 1)[-1].split()
        head = body[0] if body else ""
        return int(head[3:]) if head.startswith("sg:") and head[3:].isdigit() else None


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``<bos> prompt`` for each prompt (no ``<eos>``), left-padded: input_ids, attention_mask, numeric_values."""
    encoded = tokenizer.prompt_inputs(prompts)
    return {key: encoded[key] for key in ("input_ids", "attention_mask", "numeric_values")}


def sequence_text(tokenizer: Any, input_ids: Sequence[int], numeric_values: Sequence[float]) -> str:
    """Token text of one generated sequence with its values written out (specials and padding dropped)."""
    tokens = tokenizer.ids_to_tokens_with_values(input_ids, numeric_values)
    specials = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token}
    return codec.tokens_to_text([t for t in tokens if not (isinstance(t, str) and t in specials)])


def default_max_new_tokens(prompt: str, max_orbits: int = DEFAULT_MAX_ORBITS) -> int:
    """Room for ``sg``, the orbits, ``<lat>``, six lattice values, every coordinate and ``<eos>``.

    With a ``<composition>`` condition the orbits are bounded by the atoms left to place, not ``max_orbits``.
    """
    words = prompt.split()
    orbits = max_orbits
    if codec.COMPOSITION_MARK in words:
        orbits = max(orbits, sum(int(w[2:]) for w in words if w.startswith("n:")))
    return 1 + MAX_ORBIT_TOKENS * orbits + 1 + 2 * 6 + 1


@torch.no_grad()
def generate_crystals(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 64,
    grammar: bool = True,
    max_atoms: int = DEFAULT_MAX_ATOMS,
    max_orbits: int = DEFAULT_MAX_ORBITS,
    progress: Progress | None = None,
) -> list[GeneratedCrystal]:
    """Sample one crystal per prompt (``tokenizer.condition_prefix(...)`` text), in batches.

    ``grammar`` adds ``tokenizer.grammar_processor`` so that every sample decodes. Returns one
    :class:`GeneratedCrystal` per prompt, in order.
    """
    progress = progress or _no_progress
    batches = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    results: list[GeneratedCrystal] = []
    for batch in progress(batches, len(batches)):
        inputs = {k: v.to(model.device) for k, v in encode_prompts(tokenizer, batch).items()}
        max_length = inputs["input_ids"].shape[1] + max(default_max_new_tokens(p, max_orbits) for p in batch)
        max_length = min(max_length, model.config.n_positions)
        processors = [tokenizer.grammar_processor(max_atoms=max_atoms, max_orbits=max_orbits, max_length=max_length)] if grammar else []
        output = model.generate(
            **inputs, max_length=max_length, do_sample=do_sample, temperature=temperature if do_sample else None,
            logits_processor=processors, return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        sequences, values = output.sequences.cpu(), output.numeric_values.cpu()
        for prompt, ids, vals in zip(batch, sequences, values):
            text = sequence_text(tokenizer, ids, vals)
            try:
                structure, error = tokenizer.decode_structure(ids, vals), None
            except CrystalDecodeError as err:
                structure, error = None, f"{type(err).__name__}: {err}"
            results.append(GeneratedCrystal(prompt=prompt, text=text, structure=structure, error=error))
    return results


def describe_conditions(crystal_system: str | None, properties: Mapping[str, float] | None) -> str:
    """``"crystal_system=cubic band_gap=1.5"``: the conditions of a MatterGPT sample as text ("" for none)."""
    items = ([f"crystal_system={crystal_system}"] if crystal_system else []) + [
        f"{name}={value:g}" for name, value in (properties or {}).items()
    ]
    return " ".join(items)


@torch.no_grad()
def generate_graph_crystals(
    model: Any,
    tokenizer: Any,
    n: int,
    *,
    crystal_system: str | None = None,
    properties: Mapping[str, float] | None = None,
    temperature: float = 1.0,
    top_k: int | None = 50,
    batch_size: int = 64,
    grammar: bool = True,
    symmetry_mode: str = "graph",
    coordination: bool = True,
    progress: Progress | None = None,
) -> list[GeneratedCrystal]:
    """Sample ``n`` SLICES(-PLUS) crystals from a MatterGPT under the given conditions, in batches.

    ``crystal_system``: a name of ``CRYSTAL_SYSTEMS`` (None: unconditioned); ``properties``: values in the
    units of the model's ``property_names`` (the others unconditioned). ``grammar`` adds
    ``tokenizer.grammar_processor`` (parsable strings with a connected 3-periodic graph and, for
    SLICES-PLUS, a point group of the graph's automorphisms). Sequences end at ``config.n_positions``.
    ``symmetry_mode`` (SYMMETRY_MODES): ``"graph"`` (default) writes only rotations that act on the sampled
    graph; ``"group"`` writes a closed point group of the requested ``crystal_system`` (any group when
    unconditioned) and the decoder imposes it on the embedding (``slices.symmetrize``).
    ``coordination``: keep every node within the tokenizer's per-element degree limits and bonded element
    pairs (``tokenizer.coordination``, learned from training strings; nothing happens without one).
    """
    from training.conditions import condition_tensors

    progress = progress or _no_progress
    system = None if crystal_system is None else CRYSTAL_SYSTEMS.index(crystal_system)
    prompt = describe_conditions(crystal_system, properties)
    max_length = model.config.n_positions
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    results: list[GeneratedCrystal] = []
    for size in progress(sizes, len(sizes)):
        kwargs: dict[str, Any] = {}
        if system is not None:
            kwargs["crystal_system"] = torch.full((size,), system, device=model.device)
        if properties:
            values, mask = condition_tensors(model.config, properties, size)
            kwargs["properties"], kwargs["property_mask"] = values.to(model.device), mask.to(model.device)
        if grammar:
            kwargs["logits_processor"] = [tokenizer.grammar_processor(
                max_length=max_length, symmetry_check=symmetry_mode,
                crystal_system=crystal_system if symmetry_mode == "group" else None,
                **({} if coordination else {"coordination": None}))]
        sequences = model.generate(
            torch.full((size, 1), tokenizer.bos_token_id, device=model.device),
            attention_mask=torch.ones(size, 1, dtype=torch.long, device=model.device),
            do_sample=True, temperature=temperature, top_k=top_k, max_length=max_length,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs,
        ).cpu()
        decode = tokenizer.decode_structures if symmetry_mode == "graph" else tokenizer.decode_structures_in_group
        for ids, decoded in zip(sequences.tolist(), decode(sequences)):
            try:
                text = tokenizer.ids_to_text(ids)
            except CrystalDecodeError:
                text = ""
            if isinstance(decoded, CrystalDecodeError):
                results.append(GeneratedCrystal(prompt, text, None, f"{type(decoded).__name__}: {decoded}"))
            else:
                results.append(GeneratedCrystal(prompt, text, decoded, None))
    return results


def csp_prompt(tokenizer: Any, crystal: codec.WyckoffCrystal, template: bool = False) -> str:
    """Composition prompt of ``crystal`` (conventional-cell counts); ``template`` adds its group and orbits."""
    prompt = tokenizer.condition_prefix(composition=crystal.composition())
    if template:
        orbits = " ".join(f"{orbit.element} {orbit.token}" for orbit in crystal.orbits)
        prompt = f"{prompt} sg:{crystal.space_group} {orbits}"
    return prompt


@dataclass(frozen=True)
class CSPResult:
    """Structure-prediction summary: match rate over crystals and mean RMSE over matched ones."""

    n_crystals: int
    samples_per_crystal: int
    template: bool
    n_matched: int
    match_rate: float
    mean_rmse: float | None
    n_decoded_samples: int
    n_samples: int
    n_skipped: int


def best_rms(matcher: StructureMatcher, truth: Structure, candidates: Iterable[Structure | None]) -> float | None:
    """Smallest normalised RMS displacement between ``truth`` and a matching candidate, or None."""
    best = None
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rms = matcher.get_rms_dist(candidate, truth)
        except (ValueError, RuntimeError) as err:  # degenerate lattices in the matcher's reduction
            logger.debug("matcher failed: %s", err)
            continue
        if rms is not None and (best is None or rms[0] < best):
            best = float(rms[0])
    return best


def predict_structures(
    model: Any,
    tokenizer: Any,
    structures: Sequence[Structure],
    *,
    samples_per_crystal: int = 1,
    template: bool = False,
    temperature: float = 1.0,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> CSPResult:
    """CSP match rate and mean RMSE of ``structures`` (see the module docstring)."""
    crystals, truths, skipped = [], [], 0
    for structure in structures:
        try:
            crystals.append(codec.structure_to_crystal(structure, symprec=tokenizer.symprec))
            truths.append(structure)
        except CrystalEncodeError as err:
            logger.warning("skipping %s: %s", structure.composition.reduced_formula, err)
            skipped += 1
    prompts = [csp_prompt(tokenizer, c, template) for c in crystals for _ in range(samples_per_crystal)]
    max_atoms = max([DEFAULT_MAX_ATOMS] + [sum(c.composition().values()) for c in crystals])
    samples = generate_crystals(
        model, tokenizer, prompts, temperature=temperature, batch_size=batch_size, max_atoms=max_atoms, progress=progress,
    )
    matcher = StructureMatcher(**CSP_MATCHER_SETTINGS)
    rmses = []
    for index, truth in enumerate(truths):
        group = samples[index * samples_per_crystal:(index + 1) * samples_per_crystal]
        rms = best_rms(matcher, truth, (s.structure for s in group))
        if rms is not None:
            rmses.append(rms)
    n = len(truths)
    return CSPResult(
        n_crystals=n, samples_per_crystal=samples_per_crystal, template=template, n_matched=len(rmses),
        match_rate=len(rmses) / n if n else math.nan, mean_rmse=sum(rmses) / len(rmses) if rmses else None,
        n_decoded_samples=sum(s.structure is not None for s in samples), n_samples=len(samples), n_skipped=skipped,
    )


__all__ = [
    "CSP_MATCHER_SETTINGS",
    "SYMMETRY_MODES",
    "CSPResult",
    "GeneratedCrystal",
    "best_rms",
    "csp_prompt",
    "default_max_new_tokens",
    "describe_conditions",
    "encode_prompts",
    "generate_crystals",
    "generate_graph_crystals",
    "predict_structures",
    "sequence_text",
]
