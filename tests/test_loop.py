"""Tests of training.loop: schedule, config, a real training run, SIGKILL + exact resume, 2-process DDP."""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from crystal_tokenizers import WyckoffTokenizer
from training.data import prepare_dataset
from training.loop import (
    TRAINER_STATE,
    TrainConfig,
    TrainingConfigError,
    build_model,
    list_checkpoints,
    lr_factor,
    train,
)

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"
CHECKPOINT_FILES = {
    "model.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    TRAINER_STATE,
    "data_position_0.json",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 training and 12 validation crystals of the bundled sample, Wyckoff-encoded."""
    out = tmp_path_factory.mktemp("data")
    source = out / "rows.csv"
    import pandas as pd

    table = pd.read_csv(SAMPLE)
    pd.concat([table[table.split == "train"].head(48), table[table.split == "validation"].head(12)]).to_csv(
        source, index=False
    )
    prepare_dataset(source, out / "prepared", tokenizer=WyckoffTokenizer(), shard_size=20)
    return out / "prepared"


def tiny_config(dataset_dir: Path, output_dir: Path, **loop: object) -> dict:
    """A small WyckoffGPT run: dropout on (so RNG restore matters), accumulation 2, checkpoints every 3 steps."""
    return {
        "output_dir": str(output_dir),
        "seed": 7,
        "data": {"path": str(dataset_dir), "max_length": 192},
        "model": {
            "type": "wyckoff-gpt",
            "config": {
                "n_layer": 1,
                "n_embd": 32,
                "n_head": 2,
                "n_inner": 64,
                "n_positions": 192,
                "num_mixture_components": 2,
            },
        },
        "optim": {"lr": 2e-3, "warmup_steps": 3},
        "loop": {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 24, "log_every": 1, **loop},
        "eval": {"every_steps": 12, "max_batches": 2, "num_samples": 2, "max_new_tokens": 24},
        "checkpoint": {"every_steps": 3, "keep": 2},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_lr_factor_warms_up_then_decays_to_the_floor() -> None:
    factors = [lr_factor(s, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[100] == pytest.approx(0.1)


def test_config_rejects_unknown_keys_and_round_trips(tmp_path: Path) -> None:
    with pytest.raises(TrainingConfigError, match="unknown keys \\['lr_max'\\]"):
        TrainConfig.from_dict({"output_dir": "x", "data": {"path": "d"}, "optim": {"lr_max": 1.0}})
    with pytest.raises(TrainingConfigError, match="data"):
        TrainConfig.from_dict({"output_dir": "x"})
    config = TrainConfig.from_dict(tiny_config(tmp_path, tmp_path / "run"))
    assert TrainConfig.from_dict(config.to_dict()) == config
    for name in ("wyckoff_gpt_small", "mattergpt_small", "wyckoff_gpt_paper", "mattergpt_paper"):
        TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "training" / "configs" / f"{name}.yaml")


def test_training_lowers_the_loss_and_leaves_complete_checkpoints(dataset_dir: Path, tmp_path: Path) -> None:
    result = train(tiny_config(dataset_dir, tmp_path / "run", max_steps=12))
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(v) for step, name, v in rows if name == "train/loss"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert {name for _, name, _ in rows} >= {"eval/loss", "eval/sample_validity", "train/lr", "train/tokens_per_second"}
    assert result.steps == 12 and math.isfinite(result.best_eval_loss)
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [c.name for c in checkpoints] == ["step_00000009", "step_00000012"]
    assert all({p.name for p in c.iterdir()} == CHECKPOINT_FILES for c in checkpoints)
    assert (tmp_path / "run" / "final" / "tokenizer_config.json").exists()
    # the tokenizer learnt the train split's element statistics before training and saved them
    saved = WyckoffTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert saved.element_statistics is not None and saved.element_statistics.crystals == 48
    again = train(tiny_config(dataset_dir, tmp_path / "run", max_steps=12), resume=True)
    assert again.steps == 12  # nothing left to do: resuming a finished run changes nothing
    assert torch.equal(final_weights(tmp_path / "run")["transformer.wte.weight"], result.model.transformer.wte.weight)


def test_early_stopping_stops_after_patience(dataset_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(dataset_dir, tmp_path / "run", max_steps=40)
    config["eval"] = {
        "every_steps": 2,
        "max_batches": 1,
        "num_samples": 0,
        "early_stopping_patience": 1,
        "early_stopping_min_delta": 100.0,
    }
    result = train(config)
    assert result.stopped_early and result.steps == 4  # first eval sets the best; the second cannot beat it by 100


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(dataset_dir: Path, tmp_path: Path) -> None:
    reference = write_config(tmp_path / "ref.yaml", tiny_config(dataset_dir, tmp_path / "ref"))
    killed = write_config(tmp_path / "killed.yaml", tiny_config(dataset_dir, tmp_path / "killed"))
    command = [sys.executable, "-m", "training.cli", "train", "--config"]
    subprocess.run([*command, str(reference)], env=ENV, check=True, capture_output=True)

    kill_step = random.Random(os.getpid()).randrange(4, 20)
    process = subprocess.Popen([*command, str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.csv"
    while process.poll() is None:
        rows = metrics.read_text().splitlines()[1:] if metrics.exists() else []
        if rows and int(rows[-1].split(",")[0]) >= kill_step:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait() == -signal.SIGKILL, f"the run ended before step {kill_step}"
    checkpoints = list_checkpoints(tmp_path / "killed")
    assert all({p.name for p in c.iterdir()} == CHECKPOINT_FILES for c in checkpoints), "a half-written checkpoint"
    assert not (tmp_path / "killed" / "final").exists()
    resumed_from = int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0
    assert resumed_from < 24

    subprocess.run([*command, str(killed), "--resume"], env=ENV, check=True, capture_output=True)
    expected, got = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{name} (killed at {kill_step})"
        )
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


DDP_SCRIPT = """
import sys
from accelerate import PartialState
from safetensors.torch import save_file
from training.loop import train

result = train(sys.argv[1])
rank = PartialState().process_index
weights = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
save_file(weights, f"{sys.argv[2]}/rank{rank}.safetensors")
"""


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_agree(dataset_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ddp.yaml", tiny_config(dataset_dir, tmp_path / "run", max_steps=6))
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    # `accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up (accelerate 1.15's
    # simple launcher); torchrun through --multi_gpu with ACCELERATE_USE_CPU=1 gives two gloo CPU ranks.
    launch = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(
        [*launch, str(script), str(config), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    set_seed(7)
    initial = build_model(
        TrainConfig.from_dict(tiny_config(dataset_dir, tmp_path)).model, WyckoffTokenizer()
    ).state_dict()
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(not torch.allclose(rank0[n], initial[n]) for n in rank0)  # it trained
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert {"data_position_0.json", "data_position_1.json", "random_states_1.pkl"} <= {
        p.name for p in checkpoint.iterdir()
    }


@pytest.mark.slow
def test_mattergpt_trains_with_crystal_system_and_property_inputs(tmp_path: Path) -> None:
    prepare_dataset(SAMPLE, tmp_path / "data", representation="slices-plus", limit=12)
    config = TrainConfig.from_yaml(
        Path(__file__).resolve().parents[1] / "training" / "configs" / "mattergpt_small.yaml"
    )
    raw = config.to_dict()
    raw["output_dir"] = str(tmp_path / "run")
    raw["data"].update(path=str(tmp_path / "data"), eval_split=None)
    raw["model"]["config"].update(n_layer=1, n_embd=32, n_head=2, n_inner=64)
    raw["loop"].update(max_steps=3, micro_batch_size=4, log_every=1)
    result = train(raw)
    assert result.steps == 3 and math.isfinite(result.metrics["train/loss"])
    saved = result.model.config
    assert list(saved.property_names) == ["formation_energy_per_atom", "band_gap"]
    assert saved.property_means[0] < 0 < saved.property_stds[0]  # MP-20 formation energies are mostly negative
    from crystal_tokenizers import SlicesPlusTokenizer

    table = SlicesPlusTokenizer.from_pretrained(tmp_path / "run" / "final").coordination
    assert table is not None and table.max_degree, "the coordination table of the train split is saved with the run"


def test_a_fresh_run_refuses_a_folder_with_checkpoints(dataset_dir: Path, tmp_path: Path) -> None:
    train(tiny_config(dataset_dir, tmp_path / "run", max_steps=3))
    with pytest.raises(TrainingConfigError, match="already holds checkpoints"):
        train(tiny_config(dataset_dir, tmp_path / "run", max_steps=3))
