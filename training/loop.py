"""The training loop: Accelerate, AdamW, warm-up + cosine / one-cycle, exact resume, atomic checkpoints.

``train(config)`` runs from Python; ``crystal-lm train --config X.yaml [--resume]`` runs the same code.
The loop is model-agnostic: it calls ``model(**batch).loss``. The same script runs on one CPU, several
GPUs, DeepSpeed or FSDP through ``accelerate launch --config_file training/configs/accelerate/<x>.yaml``.

Resume is exact: a checkpoint holds the model, optimiser, scheduler and RNG states
(``accelerator.save_state``), the step counters and early-stopping state (``trainer_state.json``) and, per
rank, the data position (epoch, micro-batches consumed). Batches of an epoch are a pure function of
``(seed, epoch)``, so skipping the consumed micro-batches reproduces an uninterrupted run. A checkpoint is
written to a temporary folder and renamed into place (``os.replace``), so it is complete or absent.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from crystal_tokenizers import CrystalTokenizer
from crystal_tokenizers.protocol import StatisticsTokenizer
from training.data import CrystalCollator, iter_epoch, load_split, make_tokenizer
from training.objectives import build_objective

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"
SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "constant")
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "wyckoff-gpt": ("wyckoff_gpt", "AutoModelForCausalLM"),
    "mattergpt": ("mattergpt", "AutoModelForCausalLM"),
    "crystal-mlm": ("crystal_mlm", "AutoModelForMaskedLM"),
    "crystal-mlm-classifier": ("crystal_mlm", "AutoModelForSequenceClassification"),
}
"""``model.type`` names of crystal-lm -> (registered ``model_type``, Auto class); ``import modeling`` registers
the classes with ``AutoConfig`` and the Auto model classes. Any other ``model.type`` is a transformers
``model_type`` built with ``AutoModelForCausalLM``."""


class TrainingConfigError(ValueError):
    """A training configuration has an unknown key, a missing value or an inconsistent setting."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared dataset lives and how batches are drawn from it."""

    path: str = ""
    train_split: str = "train"
    eval_split: str | None = "validation"
    streaming: bool = False
    shuffle_buffer: int = 10_000
    max_length: int | None = 512
    crystal_system_condition: bool = False
    property_conditions: tuple[str, ...] = ()
    fit_tokenizer_statistics: int = 100_000
    """Train rows (the first ones; 0: none) from which the tokenizer learns what it keeps of its data before
    training (``fit_training_statistics``: Wyckoff element co-occurrence, SLICES-PLUS coordination table)."""


@dataclass(frozen=True)
class TokenizerConfig:
    """The tokenizer: a representation name, or a saved tokenizer (path or Hub repo id)."""

    representation: str = "wyckoff"
    pretrained: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The model: a type plus config keyword arguments, or a saved model (path or Hub repo id)."""

    type: str = "wyckoff-gpt"
    config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (``lr`` is the peak rate)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0


@dataclass(frozen=True)
class LoopConfig:
    """Batch sizes and run length (optimiser steps); ``num_epochs`` needs a map-style dataset."""

    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    max_steps: int | None = None
    num_epochs: float | None = None
    mixed_precision: str = "auto"
    log_every: int = 10


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation loss, the sample-and-decode validity check and early stopping."""

    every_steps: int = 200
    max_batches: int | None = None
    num_samples: int = 16
    max_new_tokens: int = 256
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    """How often to checkpoint (optimiser steps) and how many checkpoints to keep."""

    every_steps: int = 200
    keep: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """A complete training run (the YAML file maps one to one onto these sections)."""

    output_dir: str
    data: DataConfig
    run_name: str = "crystal-lm"
    seed: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    report_to: tuple[str, ...] = ("csv",)
    masking: dict[str, Any] | None = None
    gan: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    """Optional objective blocks (``training.objectives.build_objective``): masked reconstruction,
    adversarial fine-tuning, a property head; without them the loss is ``model(**batch).loss``."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build from nested mappings; unknown keys and missing required keys raise :class:`TrainingConfigError`."""
        kwargs = _checked_kwargs(cls, raw, "config")
        for name, section in _SECTIONS.items():
            if name in kwargs:
                kwargs[name] = section(**_checked_kwargs(section, kwargs[name] or {}, name))
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise TrainingConfigError(f"config: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML config file."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready: tuples become lists)."""
        return _plain(asdict(self))


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "loop": LoopConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
}


def _checked_kwargs(cls: type, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Keyword arguments for dataclass ``cls`` from ``raw``; YAML lists become tuples, dicts stay dicts."""
    if not isinstance(raw, Mapping):
        raise TrainingConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TrainingConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Model, optimiser and schedule
# --------------------------------------------------------------------------------------------------


def build_model(spec: ModelConfig, tokenizer: Any, extra_config: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A fresh model sized to ``tokenizer`` (or the saved one at ``spec.pretrained``).

    A config class with ``from_tokenizer`` (WyckoffGPT) reads the vocabulary and numeric token ids from
    the tokenizer; ``extra_config`` (e.g. property statistics from the data) fills keys the YAML leaves out.
    """
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    import modeling  # noqa: F401 - registers the crystal-lm configurations and models with the Auto classes

    model_type, auto_name = MODEL_TYPES.get(spec.type, (spec.type, "AutoModelForCausalLM"))
    auto_class = getattr(transformers, auto_name)
    if spec.pretrained and spec.type in MODEL_TYPES:
        return auto_class.from_pretrained(spec.pretrained, **spec.config)
    if spec.pretrained:
        return AutoModelForCausalLM.from_pretrained(spec.pretrained, trust_remote_code=True)
    kwargs = {**(extra_config or {}), **spec.config}
    if spec.type in MODEL_TYPES:
        config_class = CONFIG_MAPPING[model_type]
        if hasattr(config_class, "from_tokenizer"):
            return auto_class.from_config(config_class.from_tokenizer(tokenizer, **kwargs))
        return auto_class.from_config(config_class(**_tokenizer_sizes(tokenizer), **kwargs))
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.type, **_tokenizer_sizes(tokenizer), **kwargs))


def _tokenizer_sizes(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def property_statistics(dataset: Any, names: Sequence[str]) -> dict[str, list[Any]]:
    """``property_names`` / ``property_means`` / ``property_stds`` of ``names`` over a map-style split (data units)."""
    if not names or isinstance(dataset, datasets.IterableDataset):
        return {}
    rows = dataset["properties"]
    means, stds = [], []
    for name in names:
        values = torch.tensor([r[name] for r in rows if r.get(name) is not None], dtype=torch.float64)
        if len(values) < 2:
            raise TrainingConfigError(f"property {name!r} has fewer than two values in the training split")
        means.append(float(values.mean()))
        stds.append(max(float(values.std()), 1e-6))
    return {"property_names": list(names), "property_means": means, "property_stds": stds}


def fit_tokenizer_statistics(tokenizer: Any, dataset: Any, max_rows: int) -> None:
    """Let ``tokenizer`` learn its data statistics from the first ``max_rows`` texts of ``dataset``
    (:class:`~crystal_tokenizers.protocol.StatisticsTokenizer`; nothing for other tokenizers or ``max_rows`` 0)."""
    if max_rows <= 0 or not isinstance(tokenizer, StatisticsTokenizer):
        return
    if isinstance(dataset, datasets.Dataset):
        texts = dataset.select(range(min(max_rows, len(dataset))))["text"]
    else:  # streaming: the first rows of the stream
        texts = [row["text"] for row in itertools.islice(dataset, max_rows)]
    tokenizer.fit_training_statistics(list(texts))


def forward_arguments(model: torch.nn.Module) -> frozenset[str]:
    """Names of the explicit parameters of ``model.forward`` (a batch key not among them is dropped).

    A PEFT model forwards ``**kwargs`` to the model it wraps, so the wrapped model's signature counts.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return frozenset(p.name for p in inspect.signature(model.forward).parameters.values() if p.kind not in variadic)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and 1-D parameters are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak rate at optimiser ``step``: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over ``total_steps`` optimiser steps."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=min(0.5, max(cfg.warmup_steps, 1) / total_steps),
            cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(
                step, total_steps=total_steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
            ),
        )
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        )
    raise TrainingConfigError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after optimiser ``step``."""
    return f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (temporary folders are never listed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name))


@dataclass
class _LoopState:
    """Mutable counters of one run; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


@dataclass
class _DataPosition:
    """Where one rank is in its data: the epoch and the micro-batches of it already consumed."""

    epoch: int = 0
    batches_done: int = 0


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: _LoopState, position: _DataPosition, keep: int
) -> Path:
    """Write the checkpoint of ``state.step`` atomically: a temporary folder, then ``os.replace``."""
    root = output_dir / CHECKPOINT_DIR
    final = root / checkpoint_name(state.step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / f"data_position_{accelerator.process_index}.json").write_text(json.dumps(asdict(position)))
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else ():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so that a rename never publishes unwritten data."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> tuple[_LoopState, _DataPosition]:
    accelerator.load_state(str(checkpoint))
    state = _LoopState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    position_file = checkpoint / f"data_position_{accelerator.process_index}.json"
    if not position_file.exists():
        raise TrainingConfigError(
            f"{checkpoint} has no data position for rank {accelerator.process_index}: "
            "resume with the number of processes the checkpoint was written with"
        )
    return state, _DataPosition(**json.loads(position_file.read_text()))


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


class _CsvLog:
    """Append-only ``step,name,value`` log; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            with open(path, newline="") as handle:
                kept = [row for row in csv.reader(handle) if row and (row[0] == "step" or int(row[0]) <= resume_step)]
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerows(kept)
        elif path.exists():
            path.unlink()
        if not path.exists():
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerow(["step", "name", "value"])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerows([step, name, f"{value:.8g}"] for name, value in values.items())


def _trackers(report_to: Sequence[str]) -> list[str]:
    """Accelerate trackers among ``report_to`` (``csv`` is handled by the loop itself)."""
    chosen = []
    for name in report_to:
        if name == "csv":
            continue
        if importlib.util.find_spec(name) is None:
            logger.warning("%s is not installed; not logging to it (pip install crystal-lm[%s])", name, name)
            continue
        chosen.append(name)
    return chosen


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind."""

    output_dir: Path
    final_model_dir: Path
    steps: int
    best_eval_loss: float | None
    stopped_early: bool
    metrics: dict[str, float]
    model: torch.nn.Module
    """The trained model, unwrapped from Accelerate (on every rank)."""


class _BatchStream:
    """Endless micro-batches for one rank, epoch after epoch, tracking its :class:`_DataPosition`."""

    def __init__(
        self,
        dataset: Any,
        collator: CrystalCollator,
        cfg: TrainConfig,
        accelerator: Accelerator,
        position: _DataPosition,
    ) -> None:
        self.dataset, self.collator, self.cfg, self.accelerator = dataset, collator, cfg, accelerator
        self.position = position
        self._batches = self._open()

    def _open(self) -> Iterator[list[dict[str, Any]]]:
        return iter_epoch(
            self.dataset,
            epoch=self.position.epoch,
            seed=self.cfg.seed,
            batch_size=self.cfg.loop.micro_batch_size,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            skip_batches=self.position.batches_done,
        )

    def next(self) -> dict[str, torch.Tensor]:
        rows = next(self._batches, None)
        if rows is None:
            if self.position.batches_done == 0:
                raise TrainingConfigError(f"rank {self.accelerator.process_index} got no training rows")
            self.position = _DataPosition(epoch=self.position.epoch + 1, batches_done=0)
            self._batches = self._open()
            rows = next(self._batches)
        self.position.batches_done += 1
        return {k: v.to(self.accelerator.device) for k, v in self.collator(rows).items()}


def _total_steps(cfg: TrainConfig, train_set: Any, world_size: int) -> int:
    if cfg.loop.max_steps:
        return int(cfg.loop.max_steps)
    if cfg.loop.num_epochs is None:
        raise TrainingConfigError("set loop.max_steps or loop.num_epochs")
    if isinstance(train_set, datasets.IterableDataset):
        raise TrainingConfigError("a streaming dataset has no length: set loop.max_steps instead of loop.num_epochs")
    per_rank = len(train_set) // world_size
    micro_batches = math.ceil(per_rank / cfg.loop.micro_batch_size)
    return max(1, math.ceil(cfg.loop.num_epochs * micro_batches / cfg.loop.grad_accum_steps))


def _mixed_precision(setting: str) -> str:
    """``bf16`` only on a GPU that supports it when ``auto``; CPU runs stay in float32."""
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting == "bf16" and not torch.cuda.is_available():
        logger.warning("bf16 autocast is for GPUs; running in float32 on CPU")
        return "no"
    return setting


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, dataset: Any, collator: CrystalCollator, cfg: TrainConfig, accelerator: Accelerator
) -> float:
    """Mean per-batch loss over the evaluation split (every rank its share; averaged over rows)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    batches = iter_epoch(
        dataset,
        epoch=0,
        seed=cfg.seed,
        batch_size=cfg.loop.micro_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle=False,
    )
    for rows in batches if cfg.eval.max_batches is None else _take(batches, cfg.eval.max_batches):
        batch = {k: v.to(accelerator.device) for k, v in collator(rows).items()}
        total += torch.stack(
            [model(**batch).loss.float() * len(rows), torch.tensor(float(len(rows)), device=accelerator.device)]
        )
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def _take(items: Iterator[Any], n: int) -> Iterator[Any]:
    for _, item in zip(range(n), items):
        yield item


@torch.no_grad()
def sample_validity(model: torch.nn.Module, tokenizer: Any, num_samples: int, max_new_tokens: int) -> float | None:
    """Fraction of ``num_samples`` unconditional samples that the tokenizer decodes to a crystal.

    Samples are grammar-constrained (the tokenizer's ``grammar_processor``).

    ``None`` when the model cannot generate or the tokenizer is no :class:`~crystal_tokenizers.CrystalTokenizer`.
    """
    if num_samples <= 0 or not isinstance(tokenizer, CrystalTokenizer):
        return None
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = torch.full((num_samples, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
    output = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        max_new_tokens=max_new_tokens,
        logits_processor=[tokenizer.grammar_processor(max_length=1 + max_new_tokens)],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True,
    )
    model.train(was_training)
    decoded = tokenizer.decode_structures(output)
    return sum(not isinstance(item, Exception) for item in decoded) / num_samples


def train(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool = False,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> TrainResult:
    """Train a crystal language model; ``resume`` continues from the newest complete checkpoint.

    ``config`` is a :class:`TrainConfig`, a nested mapping or a YAML path. ``model`` and ``tokenizer``
    override the ones the config describes (e.g. a model built in a notebook).
    """
    cfg = (
        config
        if isinstance(config, TrainConfig)
        else (TrainConfig.from_yaml(config) if isinstance(config, (str, Path)) else TrainConfig.from_dict(config))
    )
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg.loop.mixed_precision),
        step_scheduler_with_optimizer=False,
        log_with=_trackers(cfg.report_to) or None,
        project_dir=str(output_dir),
    )
    set_seed(cfg.seed)
    tokenizer = (
        tokenizer if tokenizer is not None else make_tokenizer(cfg.tokenizer.representation, cfg.tokenizer.pretrained)
    )
    train_set = load_split(cfg.data.path, cfg.data.train_split, streaming=cfg.data.streaming)
    fit_tokenizer_statistics(tokenizer, train_set, cfg.data.fit_tokenizer_statistics)
    if model is None:
        model = build_model(cfg.model, tokenizer, property_statistics(train_set, cfg.data.property_conditions))
    eval_set = (
        load_split(cfg.data.path, cfg.data.eval_split, streaming=cfg.data.streaming) if cfg.data.eval_split else None
    )
    objective = build_objective(cfg, tokenizer)
    collator = objective.collator(CrystalCollator(
        tokenizer,
        max_length=cfg.data.max_length,
        crystal_system=cfg.data.crystal_system_condition,
        property_names=tuple(cfg.data.property_conditions),
        model_inputs=forward_arguments(model),
    ))
    total_steps = _total_steps(cfg, train_set, accelerator.num_processes)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    objective.prepare(accelerator, model)  # before resuming: the objective may register more state

    state, position = _LoopState(), _DataPosition()
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not resume:
        raise TrainingConfigError(
            f"{output_dir} already holds checkpoints (newest {checkpoints[-1].name}): resume the run "
            "(resume=True, --resume) or choose a new output_dir"
        )
    if resume and checkpoints:
        state, position = _load_checkpoint(accelerator, checkpoints[-1])
        logger.info("resumed from %s (step %d)", checkpoints[-1], state.step)
    elif resume:
        logger.warning("no checkpoint under %s; starting from scratch", output_dir / CHECKPOINT_DIR)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        for stale in (output_dir / CHECKPOINT_DIR).glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale)
    csv_log = _CsvLog(output_dir / METRICS_CSV, state.step if resume else None) if accelerator.is_main_process else None
    accelerator.init_trackers(cfg.run_name, config={k: str(v) for k, v in cfg.to_dict().items()})

    stream = _BatchStream(train_set, collator, cfg, accelerator, position)
    last: dict[str, float] = {}
    progress = tqdm(total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    model.train()
    window = torch.zeros(3, device=accelerator.device)  # since the last log line: summed loss, tokens, steps
    window_start = time.perf_counter()
    while state.step < total_steps and not state.stopped_early:
        step_stats = torch.zeros(2, device=accelerator.device)  # mean micro-batch loss, tokens (this rank)
        for micro in range(cfg.loop.grad_accum_steps):
            batch = stream.next()
            sync = micro == cfg.loop.grad_accum_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = objective.loss(model, batch)
                accelerator.backward(loss / cfg.loop.grad_accum_steps)
            step_stats[0] += loss.detach().float() / cfg.loop.grad_accum_steps
            step_stats[1] += batch["attention_mask"].sum()
        grad_norm = (
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip else None
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step_stats = accelerator.reduce(step_stats, reduction="sum")
        state.tokens_seen += int(step_stats[1])
        window += torch.stack(
            [step_stats[0] / accelerator.num_processes, step_stats[1], torch.ones_like(step_stats[1])]
        )
        progress.update(1)

        if state.step % cfg.loop.log_every == 0 or state.step == total_steps:
            last = {
                "train/loss": float(window[0] / window[2]),
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_second": float(window[1]) / max(time.perf_counter() - window_start, 1e-9),
                "train/epoch": float(stream.position.epoch),
            }
            if grad_norm is not None:
                last["train/grad_norm"] = float(grad_norm)
            _log(accelerator, csv_log, state.step, last)
            progress.set_postfix(loss=f"{last['train/loss']:.4f}")
            window.zero_()
            window_start = time.perf_counter()

        if eval_set is not None and (state.step % cfg.eval.every_steps == 0 or state.step == total_steps):
            last.update(_evaluate(model, eval_set, collator, cfg, accelerator, tokenizer, state))
            _log(accelerator, csv_log, state.step, {k: v for k, v in last.items() if k.startswith("eval/")})
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == total_steps or state.stopped_early:
            _save_checkpoint(accelerator, output_dir, state, stream.position, cfg.checkpoint.keep)
    progress.close()
    final_dir = _save_final(accelerator, model, tokenizer, output_dir, state, last)
    objective.save(final_dir)
    accelerator.end_training()
    return TrainResult(
        output_dir=output_dir,
        final_model_dir=final_dir,
        steps=state.step,
        best_eval_loss=state.best_eval_loss,
        stopped_early=state.stopped_early,
        metrics=last,
        model=accelerator.unwrap_model(model),
    )


def _log(accelerator: Accelerator, csv_log: _CsvLog | None, step: int, values: Mapping[str, float]) -> None:
    if csv_log is not None:
        csv_log.log(step, values)
    accelerator.log(dict(values), step=step)


def _evaluate(
    model: torch.nn.Module,
    eval_set: Any,
    collator: CrystalCollator,
    cfg: TrainConfig,
    accelerator: Accelerator,
    tokenizer: Any,
    state: _LoopState,
) -> dict[str, float]:
    """Evaluation loss, the validity check on the main process, and the early-stopping bookkeeping."""
    results = {"eval/loss": evaluate_loss(model, eval_set, collator, cfg, accelerator)}
    if accelerator.is_main_process:
        validity = sample_validity(
            accelerator.unwrap_model(model), tokenizer, cfg.eval.num_samples, cfg.eval.max_new_tokens
        )
        if validity is not None:
            results["eval/sample_validity"] = validity
    loss = results["eval/loss"]
    if state.best_eval_loss is None or loss < state.best_eval_loss - cfg.eval.early_stopping_min_delta:
        state.best_eval_loss = loss
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    patience = cfg.eval.early_stopping_patience
    if patience is not None and state.evals_without_improvement >= patience:
        state.stopped_early = True
        logger.info("early stopping at step %d: no improvement in %d evaluations", state.step, patience)
    return results


def _save_final(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    output_dir: Path,
    state: _LoopState,
    last: Mapping[str, float],
) -> Path:
    """Save the trained model + tokenizer (safetensors) and the run's metrics JSON."""
    final_dir = output_dir / FINAL_DIR
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(final_dir, state_dict=state_dict, safe_serialization=True)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(final_dir)
        metrics = {
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "best_eval_loss": state.best_eval_loss,
            **last,
        }
        (output_dir / METRICS_JSON).write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return final_dir
