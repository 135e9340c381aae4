"""Tests of training.data: prepare (encode, split, shard, card), load map-style/streaming, collate."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from crystal_tokenizers import WyckoffTokenizer
from training.data import (
    PREPARE_REPORT,
    CrystalCollator,
    EncodeOptions,
    hash_split,
    iter_epoch,
    load_split,
    prepare_dataset,
    read_source,
    source_license,
)

SAMPLE = Path(__file__).resolve().parents[1] / "crystal_tokenizers" / "data" / "mp20_sample.csv"
BROKEN_CIF = "data_broken\n_cell_length_a 3.0\n"


@pytest.fixture(scope="module")
def tokenizer() -> WyckoffTokenizer:
    return WyckoffTokenizer()


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 training + 10 validation rows of the bundled sample, plus one broken and one disordered CIF."""
    table = pd.read_csv(SAMPLE)
    rows = pd.concat([table[table.split == "train"].head(40), table[table.split == "validation"].head(10)])
    disordered = Structure.from_str(rows.iloc[0].cif, fmt="cif")
    disordered.replace_species({disordered[0].specie: {disordered[0].specie: 0.5, "K": 0.5}})
    extra = pd.DataFrame(
        [
            {"material_id": "broken-1", "cif": BROKEN_CIF, "split": "train"},
            {"material_id": "disordered-1", "cif": disordered.to(fmt="cif"), "split": "train"},
        ]
    )
    path = tmp_path_factory.mktemp("src") / "crystals.csv"
    pd.concat([rows, extra]).to_csv(path, index=False)
    (path.parent / "README.md").write_text("Materials Project data, licence CC BY 4.0.\n")
    return path


@pytest.fixture(scope="module")
def prepared(small_csv: Path, tokenizer: WyckoffTokenizer, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prepared")
    report = prepare_dataset(small_csv, out, tokenizer=tokenizer, shard_size=16)
    return out, report


def test_hash_split_is_stable_and_follows_fractions() -> None:
    ids = [f"mp-{i}" for i in range(4000)]
    first = [hash_split(i) for i in ids]
    assert first == [hash_split(i) for i in ids]
    counts = Counter(first)
    assert abs(counts["train"] / 4000 - 0.8) < 0.03
    assert abs(counts["validation"] / 4000 - 0.1) < 0.02
    assert hash_split("mp-1", (0.0, 0.0, 1.0)) == "test"
    with pytest.raises(ValueError):
        hash_split("mp-1", (0.5, 0.5, 0.5))


def test_prepare_keeps_given_splits_counts_failures_and_shards(prepared) -> None:
    out, report = prepared
    assert report.split_counts == {"train": 40, "validation": 10}
    assert report.failures_by_type == {"InvalidStructureError": 1, "DisorderedStructureError": 1}
    assert {f.material_id for f in report.failures} == {"broken-1", "disordered-1"}
    assert report.num_shards == {"train": 3, "validation": 1}
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet",
        "validation-00000-of-00001.parquet",
    ]
    saved = json.loads((out / PREPARE_REPORT).read_text())
    assert saved["failures_by_type"] == report.failures_by_type and len(saved["failures"]) == 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-4.0\n")
    assert "| train | 40 | 2 |" in card and "`DisorderedStructureError` | 1 |" in card


def test_prepared_rows_decode_back_to_their_cif(prepared, tokenizer: WyckoffTokenizer) -> None:
    out, _ = prepared
    train = load_split(out, "train")
    assert set(train.column_names) >= {"material_id", "cif", "properties", "crystal_system", "space_group", "text"}
    assert train[0]["properties"].keys() == {"formation_energy_per_atom", "band_gap", "e_above_hull"}
    matcher = StructureMatcher()
    for row in train.select(range(5)):
        decoded = tokenizer.string_to_structure(row["text"])
        assert matcher.fit(decoded, Structure.from_str(row["cif"], fmt="cif")), row["material_id"]
        assert f"sg:{row['space_group']} " in row["text"]


def test_text_conditions_go_into_the_prefix(small_csv: Path, tokenizer: WyckoffTokenizer, tmp_path: Path) -> None:
    options = EncodeOptions(text_conditions=("crystal_system", "band_gap"))
    prepare_dataset(small_csv, tmp_path, tokenizer=tokenizer, options=options, limit=6)
    row = load_split(tmp_path, "train")[0]
    assert row["text"].startswith(f"cs:{row['crystal_system']} prop:band_gap ")


def test_cif_folder_is_split_by_hash_of_file_name(prepared, tokenizer: WyckoffTokenizer, tmp_path: Path) -> None:
    out, _ = prepared
    folder = tmp_path / "cifs"
    folder.mkdir()
    rows = load_split(out, "train").select(range(12))
    for row in rows:
        (folder / f"{row['material_id']}.cif").write_text(row["cif"])
    report = prepare_dataset(folder, tmp_path / "out", tokenizer=tokenizer)
    expected = Counter(hash_split(mid) for mid in rows["material_id"])
    assert report.split_counts == {k: expected[k] for k in ("train", "validation", "test") if expected[k]}
    assert report.split_rule.startswith("SHA-256 of material_id")
    assert source_license(folder) is None and report.license == "unknown"


def test_parquet_and_dataset_folder_inputs_encode_like_csv(
    prepared, tokenizer: WyckoffTokenizer, tmp_path: Path
) -> None:
    out, _ = prepared
    source = load_split(out, "validation").select_columns(["material_id", "cif"])
    source.to_parquet(str(tmp_path / "val.parquet"))
    from_parquet = prepare_dataset(tmp_path / "val.parquet", tmp_path / "p", tokenizer=tokenizer)
    from_folder = prepare_dataset(out, tmp_path / "f", tokenizer=tokenizer)  # a Hub-style dataset folder
    assert from_parquet.total_encoded == 10
    assert from_folder.split_counts == {"train": 40, "validation": 10}
    assert from_folder.license == "cc-by-4.0"
    by_id = dict(zip(list(load_split(out, "validation")["material_id"]), list(load_split(out, "validation")["text"])))
    again = load_split(tmp_path / "f", "validation")
    assert dict(zip(list(again["material_id"]), list(again["text"]))) == by_id


def test_two_processes_write_the_same_rows(
    small_csv: Path, prepared, tokenizer: WyckoffTokenizer, tmp_path: Path
) -> None:
    out, report = prepared
    datasets.disable_caching()
    try:
        parallel = prepare_dataset(small_csv, tmp_path, tokenizer=tokenizer, shard_size=16, num_proc=2)
    finally:
        datasets.enable_caching()
    assert parallel.split_counts == report.split_counts and parallel.failures_by_type == report.failures_by_type
    assert list(load_split(tmp_path, "train")["text"]) == list(load_split(out, "train")["text"])


def test_read_source_rejects_unknown_file_types(tmp_path: Path) -> None:
    path = tmp_path / "x.xyz"
    path.write_text("1\n\nH 0 0 0\n")
    with pytest.raises(ValueError, match="unknown file type"):
        read_source(path)


@pytest.mark.parametrize("world_size", [1, 2])
def test_streaming_and_map_style_give_the_same_examples(prepared, world_size: int) -> None:
    out, _ = prepared
    map_style = load_split(out, "train")
    streaming = load_split(out, "train", streaming=True)
    assert isinstance(streaming, datasets.IterableDataset)

    def epoch_ids(dataset, epoch: int) -> Counter:
        ids: Counter = Counter()
        for rank in range(world_size):
            for batch in iter_epoch(
                dataset, epoch=epoch, seed=3, batch_size=4, rank=rank, world_size=world_size, shuffle_buffer=8
            ):
                ids.update(row["material_id"] for row in batch)
        return ids

    from_map, from_stream = epoch_ids(map_style, 0), epoch_ids(streaming, 0)
    assert from_stream == Counter(list(map_style["material_id"]))  # 40 rows over 3 shards, each exactly once
    assert from_map == from_stream  # 40 is divisible by both world sizes, so nothing is trimmed


@pytest.mark.parametrize("streaming", [False, True])
def test_skipping_batches_resumes_the_same_order(prepared, streaming: bool) -> None:
    out, _ = prepared
    dataset = load_split(out, "train", streaming=streaming)
    full = [[r["material_id"] for r in b] for b in iter_epoch(dataset, epoch=1, seed=0, batch_size=3, shuffle_buffer=8)]
    rest = [
        [r["material_id"] for r in b]
        for b in iter_epoch(dataset, epoch=1, seed=0, batch_size=3, shuffle_buffer=8, skip_batches=5)
    ]
    assert rest == full[5:]
    other_epoch = [
        [r["material_id"] for r in b] for b in iter_epoch(dataset, epoch=2, seed=0, batch_size=3, shuffle_buffer=8)
    ]
    assert other_epoch != full


def test_collator_masks_padding_and_adds_conditions(prepared, tokenizer: WyckoffTokenizer) -> None:
    out, _ = prepared
    rows = list(load_split(out, "train").select(range(4)))
    batch = CrystalCollator(tokenizer, crystal_system=True, property_names=("band_gap", "bulk_modulus"))(rows)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    is_num = batch["input_ids"] == tokenizer.num_token_id
    assert torch.equal(~torch.isnan(batch["numeric_values"]), is_num)
    assert batch["crystal_system"].tolist() == [
        ("cubic", "hexagonal", "trigonal", "tetragonal", "orthorhombic", "monoclinic", "triclinic").index(
            r["crystal_system"]
        )
        for r in rows
    ]
    assert batch["property_mask"][:, 1].sum() == 0 and batch["properties"][:, 1].abs().sum() == 0
    assert torch.allclose(batch["properties"][:, 0], torch.tensor([r["properties"]["band_gap"] for r in rows]))
    plain = CrystalCollator(
        tokenizer, max_length=16, model_inputs=frozenset({"input_ids", "attention_mask", "labels"})
    )(rows)
    assert set(plain) == {"input_ids", "attention_mask", "labels"} and plain["input_ids"].shape == (4, 16)
    assert not math.isnan(float(batch["numeric_values"][is_num].sum()))


def test_prepare_data_command_prints_counts(
    small_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main

    assert main(["prepare-data", str(small_csv), "--out", str(tmp_path), "--limit", "6", "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "wrote 6 structures" in printed and "licence cc-by-4.0" in printed
    assert len(list((tmp_path / "data").glob("train-*.parquet"))) == 2
