"""Training objectives beyond next-token prediction: masked reconstruction, adversarial fine-tuning, property heads.

The training loop (:mod:`training.loop`) stays model-agnostic through one small hook, a
:class:`TrainingObjective` built from the config's optional ``masking:``, ``gan:`` and ``task:`` blocks by
:func:`build_objective`. The loop asks it for four things: a collator wrapper (corrupt a batch, or put
property labels in), a ``prepare`` call after ``accelerator.prepare`` (extra models and optimisers, so
that ``save_state``/``load_state`` checkpoint and resume them with the run), the loss of one micro-batch,
and a ``save`` of any extra model beside the final one. Without those blocks the objective is the plain
``model(**batch).loss``.

- ``masking:`` (:class:`MaskedReconstruction`): the corruption of :mod:`crystal_tokenizers.wyckoff.masking`
  (mask all orbits of one species or a random 15 %, Gaussian coordinate noise of σ̃ × the shortest edge);
  labels only at masked and noised positions. The corruption of a batch is a pure function of the
  seed and the batch, so ``--resume`` reproduces it.
- ``gan:`` (:class:`AdversarialFineTuning`, Liu et al., arXiv:2312.14485): a Wasserstein critic initialised
  from a stability classifier reads the generator's soft species (probabilities × the critic's embedding
  matrix, no sampling) and generated coordinates; ``discriminator_steps`` critic updates per generator
  step; generator loss = ``adversarial_weight`` (0.1) × (−critic score) + ``species_weight`` × species NLL
  + ``position_mse_weight`` (200) × coordinate MSE (+ ``numeric_nll_weight`` × value NLL).
- ``task:`` (:class:`PropertyHead`): labels from a row property: ``classification`` with
  ``label = value <= threshold`` (on the convex hull: ``e_above_hull`` <= 0), or standardised ``regression``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from crystal_tokenizers.wyckoff.masking import MaskingSpec, corrupt_random

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Collate = Callable[[Sequence[Mapping[str, Any]]], Batch]


class ObjectiveConfigError(ValueError):
    """A ``masking:``, ``gan:`` or ``task:`` block has an unknown key or an inconsistent value."""


def _from_block(cls: type, block: Mapping[str, Any] | None, where: str) -> Any:
    """Dataclass ``cls`` from a config block; unknown keys raise :class:`ObjectiveConfigError`."""
    block = dict(block or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ObjectiveConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in block.items()})
    except (TypeError, ValueError) as err:
        raise ObjectiveConfigError(f"{where}: {err}") from err


# --------------------------------------------------------------------------------------------------
# The hook
# --------------------------------------------------------------------------------------------------


class TrainingObjective:
    """The plain objective: batches as collated, loss ``model(**batch).loss``, nothing extra to save."""

    def collator(self, base: Collate) -> Collate:
        """Wrap the loop's collator (identity here)."""
        return base

    def prepare(self, accelerator: Any, model: torch.nn.Module) -> None:
        """Build and ``accelerator.prepare`` any extra model/optimiser (call before resuming a checkpoint)."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The loss of one micro-batch for the loop's optimiser (the loop calls ``backward`` on it)."""
        return model(**batch).loss

    def save(self, directory: str | Path) -> None:
        """Save extra models beside the final model folder (nothing here)."""


def build_objective(config: Any, tokenizer: Any) -> TrainingObjective:
    """The objective of a training config (a ``TrainConfig`` or a mapping) from its optional blocks."""
    def block(name: str) -> Mapping[str, Any] | None:
        return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)

    seed = int(block("seed") or 0)
    if block("task") is not None:
        if block("gan") is not None or block("masking") is not None:
            raise ObjectiveConfigError("task: cannot be combined with masking: or gan:")
        return PropertyHead(_from_block(PropertySpec, block("task"), "task"))
    masking = None if block("masking") is None else _from_block(MaskingSpec, block("masking"), "masking")
    if block("gan") is not None:
        return AdversarialFineTuning(tokenizer, masking or MaskingSpec(), _from_block(GanSpec, block("gan"), "gan"), seed)
    if masking is not None:
        return MaskedReconstruction(tokenizer, masking, seed)
    return TrainingObjective()


# --------------------------------------------------------------------------------------------------
# Masked reconstruction
# --------------------------------------------------------------------------------------------------


def batch_seed(seed: int, input_ids: torch.Tensor, salt: int = 0) -> list[int]:
    """A seed sequence for ``numpy.random.default_rng`` from the run seed and the batch's ids (resume-exact)."""
    digest = hashlib.sha256(input_ids.cpu().numpy().astype(np.int64).tobytes()).digest()
    return [seed, salt, int.from_bytes(digest[:8], "big")]


def corrupt_batch(batch: Batch, tokenizer: Any, spec: MaskingSpec, rng: np.random.Generator) -> Batch:
    """Damage every row of a collated batch; labels (``labels``, ``numeric_labels``) only where damaged.

    ``labels`` holds the original element id at masked positions (-100 elsewhere); ``numeric_labels`` the
    original coordinate at noised positions (NaN elsewhere). Padding is left untouched.
    """
    input_ids = batch["input_ids"].clone()
    values = batch["numeric_values"].clone()
    labels = torch.full_like(input_ids, -100)
    numeric_labels = torch.full_like(values, math.nan)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for row, length in enumerate(lengths):
        ids = input_ids[row, :length].tolist()
        clean_values = values[row, :length].numpy().astype(float)
        damaged = corrupt_random(tokenizer.convert_ids_to_tokens(ids), clean_values, spec, rng)
        for position in damaged.masked_positions:
            labels[row, position] = ids[position]
            input_ids[row, position] = tokenizer.mask_token_id
        noised = list(damaged.noised_positions)
        if noised:
            numeric_labels[row, noised] = values[row, noised]
            values[row, noised] = torch.as_tensor(damaged.values[noised], dtype=values.dtype)
    return {**batch, "input_ids": input_ids, "numeric_values": values, "labels": labels, "numeric_labels": numeric_labels}


def clean_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The undamaged ids and values of a corrupted batch (from its labels)."""
    ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    values = torch.where(torch.isfinite(batch["numeric_labels"]), batch["numeric_labels"], batch["numeric_values"])
    return ids, values


class MaskedReconstruction(TrainingObjective):
    """Masked species + noisy coordinates reconstruction (``masking:`` block, fields of ``MaskingSpec``)."""

    def __init__(self, tokenizer: Any, spec: MaskingSpec, seed: int = 0) -> None:
        self.tokenizer, self.spec, self.seed = tokenizer, spec, seed

    def corrupt(self, batch: Batch, salt: int = 0) -> Batch:
        """The corruption of ``batch`` (deterministic in the seed, the batch and ``salt``)."""
        rng = np.random.default_rng(batch_seed(self.seed, batch["input_ids"], salt))
        return corrupt_batch({k: v.cpu() for k, v in batch.items()}, self.tokenizer, self.spec, rng)

    def collator(self, base: Collate) -> Collate:
        def collate(rows: Sequence[Mapping[str, Any]]) -> Batch:
            return self.corrupt(base(rows))

        return collate


# --------------------------------------------------------------------------------------------------
# Adversarial fine-tuning
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GanSpec:
    """The ``gan:`` block: critic checkpoint, loss weights, critic steps per generator step, critic optimiser."""

    discriminator: str = ""
    """A saved ``CrystalMLMForSequenceClassification`` folder (e.g. the stability classifier)."""
    adversarial_weight: float = 0.1
    species_weight: float = 1.0
    position_mse_weight: float = 200.0
    numeric_nll_weight: float = 0.0
    discriminator_steps: int = 1
    discriminator_lr: float = 1e-4
    discriminator_betas: tuple[float, float] = (0.5, 0.9)
    gradient_penalty: float = 10.0
    """Weight of the WGAN-GP penalty (Gulrajani et al. 2017) on the critic's input gradient; 0 disables it."""

    def __post_init__(self) -> None:
        if not self.discriminator:
            raise ValueError("gan.discriminator must name a saved classifier folder")
        if self.discriminator_steps < 1:
            raise ValueError(f"gan.discriminator_steps must be >= 1, got {self.discriminator_steps}")


def critic_score(logits: torch.Tensor) -> torch.Tensor:
    """One score per crystal (B,): the logit of a 1-output head, else last-class minus first-class logit."""
    return logits[:, 0] if logits.shape[-1] == 1 else logits[:, -1] - logits[:, 0]


def soft_inputs(
    generated: Any, batch: Batch, embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's view of a reconstruction: (B, T, D) embeddings and (B, T) values.

    At masked positions the embedding is the generator's species distribution times ``embedding`` (V, D);
    elsewhere the embedding of the clean token. Noised coordinates take the generator's point estimates;
    other values stay as given. Gradients reach the generator through both.
    """
    clean_ids, _ = clean_inputs(batch)
    masked = (batch["labels"] != -100).unsqueeze(-1)
    probabilities = torch.softmax(generated.logits.float(), dim=-1).to(embedding.dtype)
    embeds = torch.where(masked, probabilities @ embedding, embedding[clean_ids])
    noised = torch.isfinite(batch["numeric_labels"])
    values = torch.where(noised, generated.predicted_values.to(batch["numeric_values"].dtype), batch["numeric_values"])
    return embeds, values


def gradient_penalty(
    critic: torch.nn.Module,
    real: tuple[torch.Tensor, torch.Tensor],
    fake: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean (‖∇ critic(x̂)‖ − 1)² at random interpolates x̂ of real and fake embeddings and values.

    The critic runs with the math attention kernel here: the fused CPU kernels have no double backward.
    """
    weight = torch.rand(real[0].shape[0], 1, device=real[0].device)
    embeds = (weight.unsqueeze(-1) * real[0] + (1 - weight.unsqueeze(-1)) * fake[0]).requires_grad_(True)
    finite = torch.isfinite(real[1])
    values = torch.where(finite, weight * real[1] + (1 - weight) * fake[1], real[1]).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        score = critic_score(critic(inputs_embeds=embeds, numeric_values=values, attention_mask=attention_mask).logits)
    grad_embeds, grad_values = torch.autograd.grad(score.sum(), (embeds, values), create_graph=True)
    squared = grad_embeds.pow(2).sum(dim=(1, 2)) + torch.where(finite, grad_values, torch.zeros_like(grad_values)).pow(2).sum(dim=1)
    return (squared.add(1e-12).sqrt() - 1.0).pow(2).mean()


class AdversarialFineTuning(MaskedReconstruction):
    """Generator = the loop's masked model; critic + its optimiser live here (prepared with the run)."""

    def __init__(self, tokenizer: Any, masking: MaskingSpec, spec: GanSpec, seed: int = 0) -> None:
        super().__init__(tokenizer, masking, seed)
        self.gan = spec
        self.accelerator: Any = None
        self.discriminator: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def prepare(self, accelerator: Any, model: torch.nn.Module) -> None:
        """Load the critic from ``gan.discriminator`` and prepare it with its AdamW (checkpointed with the run)."""
        from modeling.modeling_crystal_mlm import CrystalMLMForSequenceClassification

        critic = CrystalMLMForSequenceClassification.from_pretrained(self.gan.discriminator)
        optimizer = torch.optim.AdamW(critic.parameters(), lr=self.gan.discriminator_lr, betas=tuple(self.gan.discriminator_betas))
        self.accelerator = accelerator
        self.discriminator, self.optimizer = accelerator.prepare(critic, optimizer)
        self.discriminator.train()

    def _critic_embedding(self) -> torch.Tensor:
        return self.accelerator.unwrap_model(self.discriminator).get_input_embeddings().weight

    def _score(self, embeds: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return critic_score(self.discriminator(inputs_embeds=embeds, numeric_values=values, attention_mask=attention_mask).logits)

    def critic_step(self, model: torch.nn.Module, batch: Batch) -> float:
        """One critic update: Wasserstein loss score(fake) − score(real) (+ gradient penalty); returns it."""
        with torch.no_grad():
            generated = model(**batch)
        embedding = self._critic_embedding()
        clean_ids, clean_values = clean_inputs(batch)
        real = (embedding[clean_ids], clean_values)
        fake = tuple(t.detach() for t in soft_inputs(generated, batch, embedding.detach()))
        mask = batch["attention_mask"]
        loss = self._score(*fake, mask).mean() - self._score(*real, mask).mean()
        if self.gan.gradient_penalty > 0:
            loss = loss + self.gan.gradient_penalty * gradient_penalty(
                self.discriminator, (real[0].detach(), real[1]), fake, mask
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return float(loss.detach())

    def generator_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Weighted reconstruction terms + ``adversarial_weight`` × (−critic score of the reconstruction)."""
        generated = model(**batch)
        self.discriminator.requires_grad_(False)
        try:
            embeds, values = soft_inputs(generated, batch, self._critic_embedding())
            adversarial = -self._score(embeds, values, batch["attention_mask"]).mean()
        finally:
            self.discriminator.requires_grad_(True)
        return (
            self.gan.adversarial_weight * adversarial
            + self.gan.species_weight * generated.species_loss
            + self.gan.position_mse_weight * generated.position_mse
            + self.gan.numeric_nll_weight * generated.numeric_loss
        )

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """``discriminator_steps`` critic updates on re-damaged copies of the batch, then the generator loss."""
        for salt in range(1, self.gan.discriminator_steps + 1):
            damaged = {k: v.to(batch["input_ids"].device) for k, v in self.corrupt(_undamaged(batch), salt).items()}
            self.critic_step(model, damaged)
        return self.generator_loss(model, batch)

    def save(self, directory: str | Path) -> None:
        """Save the critic to ``<directory>/discriminator`` (safetensors)."""
        if self.discriminator is not None and self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.discriminator).save_pretrained(Path(directory) / "discriminator")


def _undamaged(batch: Batch) -> Batch:
    """The clean batch behind a corrupted one (labels dropped), for a fresh corruption."""
    ids, values = clean_inputs(batch)
    return {"input_ids": ids.cpu(), "numeric_values": values.cpu(), "attention_mask": batch["attention_mask"].cpu()}


# --------------------------------------------------------------------------------------------------
# Property heads
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PropertySpec:
    """The ``task:`` block: which row property becomes the label, and how."""

    property: str = "e_above_hull"
    type: str = "classification"
    """``classification`` (label 1 when value <= ``threshold``) or ``regression`` (standardised value)."""
    threshold: float = 0.0
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ("classification", "regression"):
            raise ValueError(f"task.type must be classification or regression, got {self.type!r}")
        if self.std <= 0:
            raise ValueError(f"task.std must be positive, got {self.std}")

    def label(self, value: float) -> float:
        """The training label of a property value (class id or standardised value)."""
        if self.type == "classification":
            return float(value <= self.threshold)
        return (value - self.mean) / self.std


class PropertyHead(TrainingObjective):
    """Sequence classification/regression on a row property (``task:`` block)."""

    def __init__(self, spec: PropertySpec) -> None:
        self.spec = spec

    def labels(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Labels of ``rows`` (LongTensor for classification, FloatTensor for regression)."""
        values = []
        for row in rows:
            value = (row.get("properties") or {}).get(self.spec.property)
            if value is None:
                raise ObjectiveConfigError(f"row {row.get('material_id', '?')} has no property {self.spec.property!r}")
            values.append(self.spec.label(float(value)))
        dtype = torch.long if self.spec.type == "classification" else torch.float32
        return torch.tensor(values, dtype=dtype)

    def collator(self, base: Collate) -> Collate:
        def collate(rows: Sequence[Mapping[str, Any]]) -> Batch:
            return {**base(rows), "labels": self.labels(rows)}

        return collate


__all__ = [
    "AdversarialFineTuning",
    "GanSpec",
    "MaskedReconstruction",
    "ObjectiveConfigError",
    "PropertyHead",
    "PropertySpec",
    "TrainingObjective",
    "batch_seed",
    "build_objective",
    "clean_inputs",
    "corrupt_batch",
    "critic_score",
    "gradient_penalty",
    "soft_inputs",
]
