"""MatterGPT: causal masking, KV cache, conditions, condition dropout, generate kwargs, save/load, heads."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from modeling.configuration_mattergpt import MatterGPTConfig
from modeling.modeling_mattergpt import (
    MatterGPTForCausalLM,
    MatterGPTForSequenceClassification,
    drop_conditions,
    gaussian_basis,
)

VOCAB = 100
PAD, BOS, EOS = 0, 1, 2
PROPERTIES = ("formation_energy_per_atom", "band_gap")


def tiny_config(**overrides) -> MatterGPTConfig:
    """A 2-layer, 32-wide MatterGPT with two property conditions (eV/atom, eV)."""
    kwargs = dict(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        property_names=PROPERTIES,
        property_means=(-1.5, 1.2),
        property_stds=(1.0, 1.6),
        num_gaussians=16,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    kwargs.update(overrides)
    return MatterGPTConfig(**kwargs)


def tiny_lm(seed: int = 0, **overrides) -> MatterGPTForCausalLM:
    torch.manual_seed(seed)
    return MatterGPTForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


CONDITIONS = dict(
    crystal_system=torch.tensor([0, 3]),
    properties=torch.tensor([[-2.0, 0.5], [0.1, 3.0]]),
    property_mask=torch.tensor([[1, 1], [1, 0]]),
)


@pytest.mark.parametrize("dual_flow", [True, False])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(dual_flow: bool) -> None:
    model = tiny_lm(dual_flow=dual_flow)
    ids = random_ids(2, 12)
    edited = ids.clone()
    edited[:, 7] = (edited[:, 7] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        before = model(ids, **CONDITIONS).logits
        after = model(edited, **CONDITIONS).logits
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("dual_flow", [True, False])
def test_greedy_generate_with_and_without_cache_agree(dual_flow: bool) -> None:
    model = tiny_lm(dual_flow=dual_flow)
    prompt = random_ids(2, 3)
    kwargs = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20, **CONDITIONS)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 23)
    assert torch.equal(cached, uncached)


def test_incremental_logits_match_full_forward() -> None:
    model = tiny_lm()
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids, **CONDITIONS).logits
        first = model(ids[:, :6], use_cache=True, **CONDITIONS)
        rest = model(ids[:, 6:], cache=first.cache, use_cache=True, **CONDITIONS)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_as_each_prompt_alone() -> None:
    model = tiny_lm()
    short, long = random_ids(1, 2, seed=3), random_ids(1, 5, seed=4)
    batch = torch.cat([torch.cat([torch.full((1, 3), PAD), short], dim=1), long])
    mask = (batch != PAD).long()
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    together = model.generate(batch, attention_mask=mask, crystal_system=torch.tensor([1, 4]), **kwargs)
    alone_short = model.generate(short, crystal_system=torch.tensor([1]), **kwargs)
    alone_long = model.generate(long, crystal_system=torch.tensor([4]), **kwargs)
    assert torch.equal(together[0, 3:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


def test_left_padded_forward_matches_unpadded_logits() -> None:
    """Without position_ids, positions are counted over real tokens, so left padding changes nothing."""
    model = tiny_lm()
    ids = random_ids(1, 6)
    padded = torch.cat([torch.full((1, 4), PAD), ids], dim=1)
    with torch.no_grad():
        alone = model(ids, crystal_system=torch.tensor([2])).logits
        with_padding = model(padded, attention_mask=(padded != PAD).long(), crystal_system=torch.tensor([2])).logits
    torch.testing.assert_close(with_padding[:, 4:], alone, rtol=1e-5, atol=1e-5)


def test_changing_each_condition_changes_the_logits() -> None:
    model = tiny_lm()
    ids = random_ids(1, 8)
    with torch.no_grad():
        base = model(ids, crystal_system=torch.tensor([0]), properties=torch.tensor([[-1.0, 1.0]])).logits
        other_system = model(ids, crystal_system=torch.tensor([5]), properties=torch.tensor([[-1.0, 1.0]])).logits
        other_energy = model(ids, crystal_system=torch.tensor([0]), properties=torch.tensor([[0.5, 1.0]])).logits
        no_condition = model(ids).logits
    for changed in (other_system, other_energy, no_condition):
        assert (changed - base).abs().max() > 1e-3


def test_unconditioned_spellings_agree() -> None:
    """crystal_system=-1 equals None; a masked or NaN property equals leaving it out."""
    model = tiny_lm()
    ids = random_ids(1, 8)
    with torch.no_grad():
        reference = model(ids, properties=torch.tensor([[-1.0, 0.0]]), property_mask=torch.tensor([[1, 0]])).logits
        minus_one = model(
            ids,
            crystal_system=torch.tensor([-1]),
            properties=torch.tensor([[-1.0, 7.0]]),
            property_mask=torch.tensor([[1, 0]]),
        ).logits
        nan_value = model(ids, properties=torch.tensor([[-1.0, float("nan")]])).logits
        none = model(ids).logits
        all_masked = model(ids, properties=torch.tensor([[3.0, 3.0]]), property_mask=torch.zeros(1, 2)).logits
    torch.testing.assert_close(minus_one, reference, rtol=0, atol=0)
    torch.testing.assert_close(nan_value, reference, rtol=0, atol=0)
    torch.testing.assert_close(all_masked, none, rtol=0, atol=0)


def test_out_of_range_crystal_system_is_rejected() -> None:
    model = tiny_lm()
    with pytest.raises(ValueError, match="crystal_system ids"):
        model(random_ids(1, 4), crystal_system=torch.tensor([7]))


def test_drop_conditions_rates() -> None:
    torch.manual_seed(0)
    systems = torch.arange(7).repeat(1000)
    mask = torch.ones(7000, 2, dtype=torch.bool)
    kept_systems, kept_mask = drop_conditions(systems, mask, 0.0)
    assert torch.equal(kept_systems, systems) and bool(kept_mask.all())
    dropped_systems, dropped_mask = drop_conditions(systems, mask, 0.25)
    assert 0.22 < (dropped_systems == -1).float().mean() < 0.28
    assert 0.22 < (~dropped_mask).float().mean() < 0.28
    assert torch.equal(dropped_systems[dropped_systems >= 0], systems[dropped_systems >= 0])


def test_condition_dropout_trains_the_null_embeddings() -> None:
    """In training mode a conditioned batch still sends gradient to the "no condition" embeddings."""
    torch.manual_seed(0)
    model = MatterGPTForCausalLM(tiny_config(condition_dropout=0.5)).train()
    ids = random_ids(32, 10)
    out = model(
        ids,
        crystal_system=torch.arange(32) % 7,
        properties=torch.randn(32, 2),
        labels=ids,
    )
    out.loss.backward()
    embeddings = model.transformer
    null_system_grad = embeddings.crystal_system_embedding.embedding.weight.grad[7]
    assert null_system_grad.abs().sum() > 0
    assert embeddings.property_embedding.null.grad.abs().sum(dim=1).gt(0).all()
    assert embeddings.property_embedding.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        conditioned = model(ids[:2], crystal_system=torch.tensor([0, 1])).logits
        again = model(ids[:2], crystal_system=torch.tensor([0, 1])).logits
    torch.testing.assert_close(conditioned, again, rtol=0, atol=0)


def test_generate_expands_conditions_per_returned_sequence() -> None:
    """top_k=1 sampling is greedy, so each returned copy must equal greedy decoding under its own row's conditions."""
    model = tiny_lm()
    prompt = random_ids(2, 3)
    sampled = model.generate(
        prompt, do_sample=True, top_k=1, num_return_sequences=3, max_new_tokens=10, min_new_tokens=10, **CONDITIONS
    )
    assert sampled.shape == (6, 13)
    for row in range(2):
        conditions = {name: value[row : row + 1] for name, value in CONDITIONS.items()}
        greedy = model.generate(prompt[row : row + 1], do_sample=False, max_new_tokens=10, min_new_tokens=10, **conditions)
        for copy in range(3):
            assert torch.equal(sampled[3 * row + copy], greedy[0])


def test_sampling_with_temperature_top_p_runs_and_stops_at_eos() -> None:
    model = tiny_lm()
    out = model.generate(
        torch.full((2, 1), BOS),
        crystal_system=torch.tensor([2, 2]),
        properties=torch.tensor([[-0.5, 1.0], [-0.5, 1.0]]),
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        num_return_sequences=4,
        max_new_tokens=15,
    )
    assert out.shape[0] == 8 and 2 <= out.shape[1] <= 16
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB


def test_head_is_tied_by_default_and_untied_on_request() -> None:
    tied = tiny_lm()
    untied = tiny_lm(tie_word_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_sequence_classification_shapes_loss_and_last_token_pooling() -> None:
    torch.manual_seed(0)
    model = MatterGPTForSequenceClassification(tiny_config(num_labels=7)).eval()
    ids = random_ids(4, 9)
    labels = torch.tensor([0, 3, 6, 2])
    out = model(ids, labels=labels)
    assert out.logits.shape == (4, 7)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    padded = torch.cat([ids, torch.full((4, 3), PAD)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded).logits, out.logits, rtol=1e-5, atol=1e-6)
        by_mask = model(padded, attention_mask=(padded != PAD).long()).logits
    torch.testing.assert_close(by_mask, out.logits, rtol=1e-5, atol=1e-6)


def test_sequence_regression_uses_mse() -> None:
    torch.manual_seed(0)
    model = MatterGPTForSequenceClassification(tiny_config(num_labels=1)).eval()
    targets = torch.tensor([-1.2, 0.3, -3.1])
    out = model(random_ids(3, 6), labels=targets)
    assert out.logits.shape == (3, 1)
    assert model.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - targets) ** 2).mean())


def test_gaussian_basis_peaks_at_the_nearest_centre() -> None:
    z = torch.tensor([-3.0, 0.0, 1.0, 3.0])
    basis = gaussian_basis(z, num_gaussians=7, value_range=3.0)
    assert basis.shape == (4, 7)
    assert basis.argmax(dim=-1).tolist() == [0, 3, 4, 6]
    torch.testing.assert_close(basis.max(dim=-1).values, torch.ones(4))


def test_config_rejects_mismatched_property_statistics() -> None:
    with pytest.raises(StrictDataclassClassValidationError, match="one entry per property"):
        tiny_config(property_means=(0.0,))
    with pytest.raises(StrictDataclassClassValidationError, match="positive"):
        tiny_config(property_stds=(1.0, 0.0))


def test_config_counts_cache_layers_over_both_flows() -> None:
    assert tiny_config().num_hidden_layers == 4
    assert tiny_config(dual_flow=False).num_hidden_layers == 2


_FRESH_PROCESS_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, cls_folder = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]))  # same reduction order as the parent, so equality is exact
    ref = torch.load(folder + "/reference.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(cls_folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["ids"], **ref["conditions"]).logits
        cls_logits = classifier(ref["ids"]).logits
    generated = model.generate(ref["ids"][:, :3], do_sample=False, max_new_tokens=6, min_new_tokens=6,
                               **ref["conditions"])
    print(json.dumps({
        "module": type(model).__module__,
        "logits_equal": bool(torch.equal(logits, ref["logits"])),
        "cls_logits_equal": bool(torch.equal(cls_logits, ref["cls_logits"])),
        "generate_equal": bool(torch.equal(generated, ref["generated"])),
    }))
    """
)


def test_saved_folders_load_in_a_fresh_process_with_identical_outputs(tmp_path: Path) -> None:
    model = tiny_lm()
    classifier = MatterGPTForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = random_ids(2, 9)
    lm_dir, cls_dir = tmp_path / "lm", tmp_path / "cls"
    model.save_pretrained(lm_dir)
    classifier.save_pretrained(cls_dir)
    with torch.no_grad():
        reference = {
            "ids": ids,
            "conditions": CONDITIONS,
            "logits": model(ids, **CONDITIONS).logits,
            "cls_logits": classifier(ids).logits,
            "generated": model.generate(ids[:, :3], do_sample=False, max_new_tokens=6, min_new_tokens=6, **CONDITIONS),
        }
    torch.save(reference, lm_dir / "reference.pt")
    assert {"config.json", "model.safetensors", "modeling_mattergpt.py", "configuration_mattergpt.py"} <= {
        p.name for p in lm_dir.iterdir()
    }
    auto_map = json.loads((cls_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_mattergpt.MatterGPTForSequenceClassification"
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_CHECK, str(lm_dir), str(cls_dir), str(torch.get_num_threads())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules."), report
    assert report["logits_equal"] and report["cls_logits_equal"] and report["generate_equal"], report


@pytest.fixture(scope="module")
def saved_slices_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained MatterGPT over the SLICES-PLUS vocabulary, saved with its tokenizer."""
    from crystal_tokenizers import SlicesPlusTokenizer

    tokenizer = SlicesPlusTokenizer()
    folder = tmp_path_factory.mktemp("mattergpt")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), n_positions=96, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    MatterGPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_generate_samples_a_mattergpt_under_its_conditions(saved_slices_model: Path, tmp_path: Path, capsys) -> None:
    from pymatgen.core import Structure

    from training.cli import main

    out = tmp_path / "cifs"
    code = main(["generate", "--model", str(saved_slices_model), "--n", "4", "--batch-size", "2",
                 "--crystal-system", "cubic", "--property", "formation_energy_per_atom=-1.0", "--out", str(out),
                 "--json"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["sampled"] == 4 and counts["prompt"] == "crystal_system=cubic formation_energy_per_atom=-1"
    files = sorted(out.glob("*.cif"))
    assert len(files) == counts["decoded"] >= 1  # the grammar keeps the untrained model's strings decodable
    assert all(len(Structure.from_file(f)) >= 1 for f in files)


@pytest.mark.parametrize("flags", [["--space-group", "225"], ["--property", "bulk_modulus=100"],
                                   ["--crystal-system", "cubicc"]])
def test_cli_generate_rejects_conditions_a_mattergpt_lacks(saved_slices_model: Path, flags: list[str]) -> None:
    from training.cli import main

    assert main(["generate", "--model", str(saved_slices_model), "--n", "1", *flags]) == 2
