"""Continuous values inside token sequences: a Gaussian value embedding and per-kind mixture heads.

A sequence model over numeric tokens (a ``<num>`` token whose float travels beside ``input_ids``) needs two
pieces, both generic over the vocabulary:

- :class:`GaussianValueEmbedding` embeds a real value as Gaussian expansions on linear grids and on a
  log grid of ``|v|`` (plus its sign), concatenated and projected to the model width (the Matra-Genoa
  value embedding, De Breuck et al. 2025). It needs no knowledge of the value's kind: the grids cover
  fractional coordinates, lengths (Å), angles (degrees) and scalar properties at once.
- :class:`NumericValueHead` predicts a *distribution* for the next value from a hidden state, one
  mixture family per value kind (:data:`DEFAULT_VALUE_KINDS`): a von Mises mixture for periodic
  fractional coordinates in [0, 1), a log-normal mixture for lengths (Å, > 0), a Gaussian mixture
  clipped to (0, 180) for angles (degrees) and a Gaussian mixture for unbounded scalars. It gives the
  negative log-likelihood, temperature sampling and a greedy value, always inside the kind's domain.

Kinds are addressed by integer ids (their index in the head's ``kinds``); id ``-1`` means "no value".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.import_utils import is_torchdynamo_compiling

NO_KIND = -1
FAMILIES: tuple[str, ...] = ("von_mises", "log_normal", "normal")
_MIN_SCALE = 1e-3
"""Floor of a component's standardised width (and of a von Mises concentration)."""
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ValueKind:
    """One kind of continuous value and its mixture family.

    ``location`` / ``scale`` standardise the value before the mixture (in log space for ``log_normal``,
    e.g. ``location=log(5 Å)``); ``low`` / ``high`` are open domain bounds, enforced by clipping samples
    (``normal`` family only). ``von_mises`` values live in [0, 1) and ignore the other fields.
    """

    name: str
    family: str
    location: float = 0.0
    scale: float = 1.0
    low: float | None = None
    high: float | None = None
    clip_margin: float = 1e-2

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"value kind {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.scale <= 0:
            raise ValueError(f"value kind {self.name!r}: scale must be positive, got {self.scale}")


DEFAULT_VALUE_KINDS: dict[str, ValueKind] = {
    "fractional": ValueKind("fractional", "von_mises"),
    "length": ValueKind("length", "log_normal", location=math.log(5.0), scale=0.5),
    "angle": ValueKind("angle", "normal", location=90.0, scale=10.0, low=0.0, high=180.0),
    "scalar": ValueKind("scalar", "normal", location=0.0, scale=1.0),
}
"""Kinds of the crystal formats: fractional coordinates, lengths (Å), angles (degrees), scalar properties."""


def gaussian_expansion(values: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """``exp(-(v - c)^2 / (2 width^2))`` for every centre: (...,) -> (..., K)."""
    return torch.exp(-0.5 * ((values.unsqueeze(-1) - centres) / width) ** 2)


class GaussianValueEmbedding(nn.Module):
    """Real values (...,) -> (..., n_embd): linear-grid and log-grid Gaussian expansions, projected.

    Each linear grid puts ``num_linear`` centres evenly on ``[low, high]`` with widths equal to their
    spacing; the log grid puts ``num_log`` centres evenly on ``[log(low), log(high)]`` and expands
    ``log(|v|)``; the sign of ``v`` is one more feature. Values must be finite (mask before calling).
    """

    def __init__(
        self,
        n_embd: int,
        linear_ranges: Sequence[Sequence[float]] = ((0.0, 1.0), (-10.0, 10.0), (0.0, 200.0)),
        num_linear: int = 32,
        log_range: Sequence[float] = (1e-3, 1e3),
        num_log: int = 64,
    ) -> None:
        super().__init__()
        if num_linear < 2 or num_log < 2:
            raise ValueError(f"need at least 2 centres per grid, got num_linear={num_linear}, num_log={num_log}")
        if not 0 < log_range[0] < log_range[1]:
            raise ValueError(f"log_range must satisfy 0 < low < high, got {tuple(log_range)}")
        self.linear_ranges = tuple((float(low), float(high)) for low, high in linear_ranges)
        self.num_linear, self.num_log = num_linear, num_log
        self.log_bounds = (math.log(log_range[0]), math.log(log_range[1]))
        self.linear_widths = tuple((high - low) / (num_linear - 1) for low, high in self.linear_ranges)
        self.log_floor = float(log_range[0]) * 1e-3
        self.log_width = (self.log_bounds[1] - self.log_bounds[0]) / (num_log - 1)
        linear_centres, log_centres = self.centre_grids()
        self.register_buffer("linear_centres", linear_centres)
        self.register_buffer("log_centres", log_centres)
        self.projection = nn.Linear(len(self.linear_ranges) * num_linear + num_log + 1, n_embd)

    def centre_grids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres of the linear grids (G, num_linear) and of the log grid (num_log,), from the constructor arguments."""
        grids = [torch.linspace(low, high, self.num_linear) for low, high in self.linear_ranges]
        linear = torch.stack(grids) if grids else torch.zeros(0, self.num_linear)
        return linear, torch.linspace(*self.log_bounds, self.num_log)

    def constant_buffers(self) -> dict[str, torch.Tensor]:
        """The centre grids by buffer name (constants: rebuilt, never learned)."""
        linear, log = self.centre_grids()
        return {"linear_centres": linear, "log_centres": log}

    def features(self, values: torch.Tensor) -> torch.Tensor:
        """The concatenated expansion (..., num_features) of ``values`` (float32)."""
        values = values.float()
        parts = [
            gaussian_expansion(values, centres, width)
            for centres, width in zip(self.linear_centres, self.linear_widths)
        ]
        log_abs = torch.log(values.abs().clamp(min=self.log_floor))
        parts.append(gaussian_expansion(log_abs, self.log_centres, self.log_width))
        parts.append(torch.sign(values).unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        features = self.features(values)
        return self.projection(features.to(self.projection.weight.dtype))


def value_embedding_from_config(config: Any) -> GaussianValueEmbedding:
    """The Gaussian value embedding of a config's ``value_*`` grid fields."""
    return GaussianValueEmbedding(
        config.n_embd, linear_ranges=config.value_linear_ranges, num_linear=config.value_num_linear,
        log_range=config.value_log_range, num_log=config.value_num_log,
    )


def add_value_embeddings(
    embeddings: torch.Tensor, values: torch.Tensor | None, has_value: torch.Tensor, value_embedding: nn.Module
) -> torch.Tensor:
    """``embeddings`` (B, T, D) plus the embedding of each value (B, T) where ``has_value`` (no data-dependent branch)."""
    if values is None:
        return embeddings
    has_value = has_value & torch.isfinite(values)
    if not is_torchdynamo_compiling() and not bool(has_value.any()):  # eager fast path (e.g. most decode steps)
        return embeddings
    safe = torch.where(has_value, values, torch.zeros_like(values))
    return embeddings + value_embedding(safe) * has_value.unsqueeze(-1).to(embeddings.dtype)


def kind_lookup(config: Any) -> tuple[tuple[str, ...], torch.Tensor]:
    """Kind names (in head order) and a (vocab_size,) tensor mapping each token id to its kind index or -1.

    Reads ``config.numeric_kind_token_ids`` (kind name -> label token ids) and ``config.vocab_size``.
    """
    unknown = sorted(set(config.numeric_kind_token_ids) - set(DEFAULT_VALUE_KINDS))
    if unknown:
        raise ValueError(f"numeric_kind_token_ids has unknown kinds {unknown}; known: {sorted(DEFAULT_VALUE_KINDS)}")
    names = tuple(name for name in DEFAULT_VALUE_KINDS if name in config.numeric_kind_token_ids)
    table = torch.full((config.vocab_size,), NO_KIND, dtype=torch.long)
    for index, name in enumerate(names):
        table[torch.as_tensor(config.numeric_kind_token_ids[name], dtype=torch.long)] = index
    return names, table


def require_numeric_tokens(config: Any, model_name: str) -> None:
    """Refuse a config without value label tokens: such a model could never emit or read a value."""
    if not config.numeric_kind_token_ids:
        raise ValueError(
            f"{model_name}: config.numeric_kind_token_ids is empty, so the model would have no value heads and "
            f"every <num> would stay without a value (undecodable crystals). Build the config from the tokenizer: "
            f"{type(config).__name__}.from_tokenizer(tokenizer, n_layer=..., ...)."
        )


def numeric_head_from_config(config: Any) -> NumericValueHead:
    """The per-kind mixture head of a config's value kinds (``numeric_kind_token_ids``)."""
    names, _ = kind_lookup(config)
    return NumericValueHead(config.n_embd, [DEFAULT_VALUE_KINDS[name] for name in names], config.num_mixture_components)


def _mixture_parts(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split raw (..., 3, M) into log-weights, locations and positive widths/concentrations."""
    logits, loc, raw_scale = params.unbind(dim=-2)
    return F.log_softmax(logits, dim=-1), loc, F.softplus(raw_scale) + _MIN_SCALE


def _standardise(kind: ValueKind, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised values and the log-Jacobian ``log |dz/dv|`` of the map (for densities in data units)."""
    if kind.family == "log_normal":
        log_values = torch.log(values.clamp(min=1e-12))
        return (log_values - kind.location) / kind.scale, -math.log(kind.scale) - log_values
    return (values - kind.location) / kind.scale, torch.full_like(values, -math.log(kind.scale))


def mixture_log_prob(kind: ValueKind, params: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Log-density (N,) of ``values`` (N,) in data units under raw mixture parameters (N, 3, M).

    Von Mises densities are over x in [0, 1): ``p(x) = 2π Σ w_k exp(κ_k cos(2πx - μ_k)) / (2π I0(κ_k))``.
    """
    log_weights, loc, scale = _mixture_parts(params.float())
    values = values.float()
    if kind.family == "von_mises":
        theta = 2.0 * math.pi * values.unsqueeze(-1)
        # log I0(κ) = log(i0e(κ)) + κ keeps large concentrations finite.
        component = scale * (torch.cos(theta - loc) - 1.0) - torch.log(torch.special.i0e(scale))
        return torch.logsumexp(log_weights + component, dim=-1)
    z, log_jacobian = _standardise(kind, values)
    component = -0.5 * ((z.unsqueeze(-1) - loc) / scale) ** 2 - torch.log(scale) - _LOG_SQRT_2PI
    return torch.logsumexp(log_weights + component, dim=-1) + log_jacobian


def _to_domain(kind: ValueKind, z_or_angle: torch.Tensor) -> torch.Tensor:
    """Map a component draw (standardised value, or an angle in radians for von Mises) into the domain."""
    if kind.family == "von_mises":
        fraction = torch.remainder(z_or_angle / (2.0 * math.pi), 1.0)
        return torch.where(fraction >= 1.0, torch.zeros_like(fraction), fraction)
    if kind.family == "log_normal":
        return torch.exp(kind.location + kind.scale * z_or_angle)
    values = kind.location + kind.scale * z_or_angle
    if kind.low is not None or kind.high is not None:
        low = None if kind.low is None else kind.low + kind.clip_margin
        high = None if kind.high is None else kind.high - kind.clip_margin
        values = values.clamp(min=low, max=high)
    return values


def mixture_sample(
    kind: ValueKind,
    params: torch.Tensor,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one value (N,) per row of raw parameters (N, 3, M), in data units and inside the domain.

    Temperature T divides the mixture logits and the von Mises concentrations and multiplies Gaussian
    widths by sqrt(T) (each component raised to the power 1/T). ``greedy`` returns the location of the
    heaviest component (its mode).
    """
    log_weights, loc, scale = _mixture_parts(params.float())
    if greedy:
        component = log_weights.argmax(dim=-1, keepdim=True)
    else:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive for sampling, got {temperature}")
        probs = torch.softmax(log_weights / temperature, dim=-1)
        component = torch.multinomial(probs, 1, generator=generator)
    loc = loc.gather(-1, component).squeeze(-1)
    scale = scale.gather(-1, component).squeeze(-1)
    if greedy:
        return _to_domain(kind, loc)
    if kind.family == "von_mises":
        concentration = (scale / temperature).double()
        draw = torch.distributions.VonMises(loc.double(), concentration).sample().float()
    else:
        noise = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        draw = loc + scale * math.sqrt(temperature) * noise
    return _to_domain(kind, draw)


def mixture_point_estimate(kind: ValueKind, params: torch.Tensor) -> torch.Tensor:
    """Differentiable point estimate (...) of raw mixture parameters (..., 3, M), in data units.

    Von Mises: the weighted circular mean of the component locations, as a fraction in [0, 1). Other
    families: the weighted mean of the standardised locations, mapped back to data units.
    """
    logits, loc, _ = params.float().unbind(dim=-2)
    weights = torch.softmax(logits, dim=-1)
    if kind.family == "von_mises":
        angle = torch.atan2((weights * torch.sin(loc)).sum(-1), (weights * torch.cos(loc)).sum(-1))
        return torch.remainder(angle / (2.0 * math.pi), 1.0)
    z = (weights * loc).sum(-1)
    if kind.family == "log_normal":
        return torch.exp(kind.location + kind.scale * z)
    return kind.location + kind.scale * z


class NumericValueHead(nn.Module):
    """Hidden states (..., n_embd) -> raw mixture parameters (..., 3, M) of the value kind at each position."""

    def __init__(self, n_embd: int, kinds: Sequence[ValueKind], num_components: int) -> None:
        super().__init__()
        if not kinds:
            raise ValueError("NumericValueHead needs at least one value kind")
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.kinds = tuple(kinds)
        self.num_components = num_components
        self.projection = nn.Linear(n_embd, len(self.kinds) * 3 * num_components)

    def forward(self, hidden: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        """Parameters (..., 3, M) of the kind ``kind_ids`` (...,) at each position (zeros where -1)."""
        raw = self.projection(hidden).unflatten(-1, (len(self.kinds), 3, self.num_components))
        index = kind_ids.clamp(min=0)[..., None, None, None].expand(*kind_ids.shape, 1, 3, self.num_components)
        selected = raw.gather(-3, index).squeeze(-3)
        return torch.where((kind_ids >= 0)[..., None, None], selected, torch.zeros_like(selected))

    def point_estimate(self, params: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
        """Differentiable point estimate (...) of raw parameters (..., 3, M) of kind ``kind_ids`` (NaN where -1).

        Every kind is evaluated everywhere and the right one selected, so there is no data-dependent branch.
        """
        estimates = torch.stack([mixture_point_estimate(kind, params) for kind in self.kinds], dim=-1)
        selected = estimates.gather(-1, kind_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(kind_ids >= 0, selected, torch.full_like(selected, math.nan))

    def log_prob(self, params: torch.Tensor, kind_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Log-density (N,) of ``values`` (N,) given parameters (N, 3, M) and kinds (N,), all kinds >= 0."""
        out = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        for kind_id, kind in enumerate(self.kinds):
            rows = kind_ids == kind_id
            if bool(rows.any()):
                out[rows] = mixture_log_prob(kind, params[rows], values[rows])
        return out

    def sample(
        self,
        params: torch.Tensor,
        kind_ids: torch.Tensor,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One value (N,) per row, NaN where ``kind_ids`` is -1."""
        out = torch.full(kind_ids.shape, math.nan, dtype=torch.float32, device=params.device)
        for kind_id, kind in enumerate(self.kinds):
            rows = kind_ids == kind_id
            if bool(rows.any()):
                out[rows] = mixture_sample(kind, params[rows], temperature, greedy, generator)
        return out


__all__ = [
    "DEFAULT_VALUE_KINDS",
    "add_value_embeddings",
    "kind_lookup",
    "mixture_point_estimate",
    "numeric_head_from_config",
    "require_numeric_tokens",
    "value_embedding_from_config",
    "NO_KIND",
    "GaussianValueEmbedding",
    "NumericValueHead",
    "ValueKind",
    "gaussian_expansion",
    "mixture_log_prob",
    "mixture_sample",
]
