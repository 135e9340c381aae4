"""Tests of training.hub and hub_cards: cards, the local and mocked-Hub upload paths, loading in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
from huggingface_hub import DatasetCard, HfApi, ModelCard

from crystal_tokenizers import WyckoffTokenizer
from hub_cards import flatten_metrics
from training.data import load_split, prepare_dataset
from training.hub import HubPushError, check_model_folder, push_folder
from training.loop import train

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hubdata")
    table = pd.read_csv(SAMPLE)
    pd.concat([table.head(24), table[table.split == "validation"].head(6)]).to_csv(root / "rows.csv", index=False)
    (root / "README.md").write_text("Materials Project data (CC BY 4.0).\n")
    prepare_dataset(root / "rows.csv", root / "prepared", tokenizer=WyckoffTokenizer(), shard_size=10)
    return root / "prepared"


@pytest.fixture(scope="module")
def run_dir(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step WyckoffGPT run plus an evaluation metrics JSON beside its final folder."""
    out = tmp_path_factory.mktemp("run")
    train(
        {
            "output_dir": str(out),
            "data": {"path": str(prepared), "max_length": 192},
            "model": {
                "type": "wyckoff-gpt",
                "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 256},
            },
            "loop": {"micro_batch_size": 4, "max_steps": 4, "log_every": 2},
            "eval": {"every_steps": 4, "max_batches": 1, "num_samples": 0},
            "checkpoint": {"every_steps": 4},
        }
    )
    metrics = {"n": 200, "validity": {"structural": 0.93, "compositional": 0.81}, "histograms": {"element": {"O": 40}}}
    (out / "final" / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_flatten_metrics_keeps_finite_numbers() -> None:
    assert flatten_metrics({"a": 1, "b": {"c": 0.5, "d": "x", "e": float("nan"), "f": True}}) == {"a": 1.0, "b.c": 0.5}


def test_push_model_to_local_dir_writes_repo_with_filled_card(run_dir: Path, tmp_path: Path) -> None:
    result = push_folder(
        run_dir / "final", "crystal-lm/wyckoff-gpt-tiny", local_dir=tmp_path, datasets=["crystal-lm/mp20-wyckoff"]
    )
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "vocab.json", "README.md"} <= set(result.files)
    assert {"modeling_wyckoff_gpt.py", "configuration_wyckoff_gpt.py", "tokenization_wyckoff.py"} <= set(result.files)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        result.files
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"crystal-generation", "wyckoff", "wyckoff_gpt"} <= set(card.data.tags)
    assert card.data.datasets == ["crystal-lm/mp20-wyckoff"] and card.data.license == "apache-2.0"
    assert "| validity.structural | 0.93 |" in card.text and "| n | 200 |" in card.text
    assert "histograms" not in card.text
    assert 'from_pretrained("crystal-lm/wyckoff-gpt-tiny", trust_remote_code=True)' in card.text


def test_push_model_sends_the_same_operations_to_the_hub_api(run_dir: Path, tmp_path: Path) -> None:
    local = push_folder(run_dir / "final", "org/model", local_dir=tmp_path)
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.return_value = "https://huggingface.co/org/model"
    remote = push_folder(run_dir / "final", "org/model", private=True, api=api)
    api.create_repo.assert_called_once_with("org/model", repo_type="model", private=True, exist_ok=True)
    operations = api.create_commit.call_args.kwargs["operations"]
    assert [op.path_in_repo for op in operations] == list(local.files) == list(remote.files)
    assert remote.target == "https://huggingface.co/org/model"


def test_push_dataset_renders_card_for_the_repo_and_loads_back(prepared: Path, tmp_path: Path) -> None:
    result = push_folder(prepared, "crystal-lm/mp20-tiny", repo_type="dataset", local_dir=tmp_path)
    assert "prepare_report.json" in result.files and "data/train-00000-of-00003.parquet" in result.files
    card = DatasetCard.load(tmp_path / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.size_categories == "n<1K"
    assert 'load_dataset("crystal-lm/mp20-tiny", split="train")' in card.text
    assert list(load_split(tmp_path, "train")["material_id"]) == list(load_split(prepared, "train")["material_id"])


def test_model_folder_without_remote_code_is_rejected(run_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((run_dir / "final" / "config.json").read_text())
    config.pop("auto_map")
    (broken / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer_config.json", "tokenization_wyckoff.py"):
        (broken / name).write_text((run_dir / "final" / name).read_text())
    with pytest.raises(HubPushError, match="no auto_map"):
        check_model_folder(broken)
    (broken / "tokenization_wyckoff.py").unlink()
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(HubPushError, match="tokenization_wyckoff.py is missing"):
        check_model_folder(broken)


LOAD_AND_GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from pymatgen.core import Structure

folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
torch.manual_seed(0)
prompt = torch.full((4, 1), tokenizer.bos_token_id)
out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=160,
                     return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                     logits_processor=[tokenizer.grammar_processor(max_length=161)])
cifs = [s.to(fmt="cif") for s in tokenizer.decode_structures(out) if not isinstance(s, Exception)]
assert all(len(Structure.from_str(c, fmt="cif")) > 0 for c in cifs)
print(type(tokenizer).__name__, type(model).__name__, len(cifs))
"""


@pytest.mark.slow
def test_pushed_folder_loads_in_a_fresh_process_and_generates_cifs(run_dir: Path, tmp_path: Path) -> None:
    push_folder(run_dir / "final", "org/model", local_dir=tmp_path / "repo")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(tmp_path / "repo")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tokenizer_name, model_name, decoded = done.stdout.split()
    assert (tokenizer_name, model_name) == ("WyckoffTokenizer", "WyckoffGPTForCausalLM")
    assert int(decoded) == 4  # the grammar processor keeps every sample decodable


def test_push_command_writes_a_local_repo(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    assert main(["push", str(run_dir / "final"), "--repo-id", "org/m", "--local-dir", str(tmp_path), "--private"]) == 0
    assert "model org/m:" in capsys.readouterr().out
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "transformers"


def test_card_has_model_index_and_datasets_from_the_run(run_dir: Path, tmp_path: Path) -> None:
    """Without --dataset the card names the run's prepared data; the metrics become Hub model-index results."""
    from training.hub import run_training_data

    datasets, description = run_training_data(run_dir)
    assert datasets == ("rows",) and "rows.csv" in description
    push_folder(run_dir / "final", "org/model", local_dir=tmp_path, datasets=datasets, training_data=description)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.datasets == ["rows"]
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"validity.structural", "validity.compositional"}  # n is a count, not a result
    assert results["validity.structural"].metric_value == 0.93
    assert results["validity.structural"].metric_type == "validity_structural"
    assert results["validity.structural"].task_type == "text-generation"
    assert results["validity.structural"].dataset_type == "rows"
    assert "model-index:" in (tmp_path / "README.md").read_text()
