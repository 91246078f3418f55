"""LoRA extraction by truncated SVD: the math on hand-written matrices, exact at the full rank of
the difference, monotone in the rank, per-layer ranks by energy, GPT-2's Conv1D, peft loads the
result, the three sources (a model folder, a LoRA adapter, a freeze output) and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.cli import main
from deltatune.extract import (extract_lora, low_rank_factors, rank_for_energy, retained_energy, singular_triplets)
from deltatune.methods.lora import LoRALayer

from conftest import tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def fine_tuned(make, seed: int = 1, scale: float = 0.05, only_linear: bool = False):
    """``make()`` with every weight moved by a random full-rank difference (a stand-in for full
    fine-tuning); ``only_linear``: the linear layers' weights alone."""
    model = make()
    generator = torch.Generator().manual_seed(seed)
    linear = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear,)) or type(m).__name__ == "Conv1D"}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not only_linear or name in linear:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def decaying_difference(make, decay: float = 0.5, seed: int = 2):
    """``make()`` with each linear weight moved by Σ_i decayⁱ·u_i v_iᵀ: a spectrum that falls like a
    real fine-tune's, so the logits approach the tuned ones as more directions are kept."""
    model = make()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                out_features, in_features = module.weight.shape
                k = min(out_features, in_features)
                U, _ = torch.linalg.qr(torch.randn(out_features, k, generator=generator))
                V, _ = torch.linalg.qr(torch.randn(in_features, k, generator=generator))
                module.weight.add_((U * (0.3 * decay ** torch.arange(k))) @ V.T)
    return model


# --- the math ----------------------------------------------------------------------------
def test_factors_of_a_hand_written_rank_two_matrix():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (3, 2) orthonormal columns
    v = torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (4, 2)
    delta = u @ torch.diag(torch.tensor([3.0, 2.0])) @ v.T  # (3, 4), singular values 3 and 2
    U, S, Vh = singular_triplets(delta)
    assert torch.allclose(S, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64), atol=1e-12)
    lora_A, lora_B = low_rank_factors(U, S, Vh, 2)
    assert lora_A.shape == (2, 4) and lora_B.shape == (3, 2)
    assert torch.allclose(lora_B @ lora_A, delta.double(), atol=1e-12)  # s = α/r = 1
    lora_A, lora_B = low_rank_factors(U, S, Vh, 1)
    assert torch.allclose(lora_B @ lora_A, 3.0 * u[:, :1].double() @ v[:, :1].T.double(), atol=1e-12)
    assert torch.allclose(lora_A.norm(), lora_B.norm())  # √σ on both sides
    assert retained_energy(S, 1) == pytest.approx(9 / 13) and retained_energy(S, 2) == pytest.approx(1.0)


@pytest.mark.parametrize("energy,rank", [(0.5, 1), (0.64, 1), (0.65, 2), (0.9, 2), (0.93, 3), (1.0, 3)])
def test_rank_for_energy_keeps_the_fewest_directions_that_reach_the_share(energy, rank):
    assert rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), energy) == rank  # shares 9/14, 13/14, 1


# --- exact at full rank, monotone below -------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_full_rank_reproduces_the_tuned_model(make):
    tuned = fine_tuned(make)
    extraction = extract_lora(make(), tuned, rank=32, include_other=True)  # 32 = min(out, in) of every layer
    assert all(layer.rank == layer.full_rank and layer.energy == pytest.approx(1.0) for layer in extraction.layers)
    assert (logits(extraction.model) - logits(tuned)).abs().max() < 1e-4
    merged = dt.merge(extraction.model)
    assert (logits(merged) - logits(tuned)).abs().max() < 1e-4


def test_without_include_other_only_the_linear_weights_are_saved_and_the_rest_is_listed():
    tuned = fine_tuned(tiny_llama)
    extraction = extract_lora(tiny_llama(), tuned, rank=32)
    assert "model.embed_tokens.weight" in extraction.other and "model.norm.weight" in extraction.other
    assert not extraction.saved_modules and not extraction.saved_biases
    assert any("not saved (pass --include-other" in line and "model.norm.weight" in line for line in extraction.lines())
    linear_only = fine_tuned(tiny_llama, only_linear=True)  # nothing else differs: exact without it
    extraction = extract_lora(tiny_llama(), linear_only, rank=32)
    assert extraction.other == () and (logits(extraction.model) - logits(linear_only)).abs().max() < 1e-4


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@torch.no_grad()
def test_the_weight_error_is_the_dropped_energy_and_falls_as_the_rank_grows(make):
    tuned = fine_tuned(make)
    base_weights = {n: p.detach().clone() for n, p in make().named_parameters(remove_duplicate=False)}
    tuned_weights = dict(tuned.named_parameters(remove_duplicate=False))  # GPT-2's lm_head is tied to wte
    previous = None
    for rank in (1, 2, 4, 8, 16, 32):
        model = extract_lora(make(), tuned, rank=rank).model
        errors = {}
        for path, layer in model.base_model.named_modules():
            if isinstance(layer, LoRALayer):
                W = tuned_weights[f"{path}.weight"].double()
                delta = W - base_weights[f"{path}.weight"].double()
                delta = delta.T if layer.transposed else delta  # Conv1D stores (in × out)
                S = torch.linalg.svdvals(delta)
                error = delta - layer.lora_B["default"].double() @ layer.lora_A["default"].double()
                assert error.norm() ** 2 == pytest.approx(float((S[rank:] ** 2).sum()), rel=1e-4, abs=1e-8)  # Eckart–Young
                errors[path] = float(error.norm())
        if previous is not None:
            assert all(errors[p] < previous[p] or errors[p] < 1e-5 for p in errors)
        previous = errors


def test_the_logit_error_falls_monotonically_as_the_rank_grows():
    tuned = decaying_difference(tiny_llama)
    errors = [float((logits(extract_lora(tiny_llama(), tuned, rank=rank).model) - logits(tuned)).abs().max())
              for rank in (1, 2, 4, 8, 16, 32)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def test_energy_picks_per_layer_ranks_written_as_patterns(tmp_path):
    tuned = fine_tuned(tiny_llama, only_linear=True)
    extraction = extract_lora(tiny_llama(), tuned, energy=0.9)
    for layer in extraction.layers:
        delta = (tuned.get_submodule(layer.path).weight - tiny_llama().get_submodule(layer.path).weight).detach()
        S = torch.linalg.svdvals(delta.double())
        assert layer.energy >= 0.9 and (layer.rank == 1 or retained_energy(S, layer.rank - 1) < 0.9)
        assert layer.parameters == layer.rank * sum(delta.shape)
    ranks = {layer.rank for layer in extraction.layers}
    assert len(ranks) > 1  # a random difference spreads over every direction: k_proj/v_proj (16 wide) need fewer
    dt.save_adapter(extraction.model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == {k: int(v) for k, v in config["alpha_pattern"].items()}
    assert torch.equal(logits(dt.load_adapter(tiny_llama(), tmp_path)), logits(extraction.model))


def test_parameter_counts_are_reported():
    extraction = extract_lora(tiny_llama(), fine_tuned(tiny_llama, only_linear=True), rank=2)
    q_proj = next(layer for layer in extraction.layers if layer.path.endswith("self_attn.q_proj"))
    assert q_proj.parameters == 2 * (32 + 32) and q_proj.rank == 2
    assert extraction.parameters == sum(layer.parameters for layer in extraction.layers)
    assert f"adapter parameters {extraction.parameters:,}" in extraction.lines()[-1]


# --- peft loads it ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_loads_the_adapter_and_matches_the_tuned_model_at_full_rank(make, tmp_path):
    import peft

    tuned = fine_tuned(make)
    extraction = extract_lora(make(), tuned, rank=32, include_other=True)
    dt.save_adapter(extraction.model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    assert (logits(theirs) - logits(tuned)).abs().max() < 1e-4
    assert (logits(dt.load_adapter(make(), tmp_path)) - logits(tuned)).abs().max() < 1e-4
    if make is tiny_gpt2:  # Conv1D: peft reads the (out × in) factors through fan_in_fan_out
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["fan_in_fan_out"] and config["bias"] == "lora_only"
        assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in load_file(
            str(tmp_path / "adapter_model.safetensors"))


# --- the command and its three sources ---------------------------------------------------------
@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    return folder


def test_extract_from_a_fully_fine_tuned_model_folder(base_folder, tmp_path, capsys):
    tuned = fine_tuned(tiny_llama)
    tuned.save_pretrained(tmp_path / "tuned")
    output = tmp_path / "lora"
    assert main(["extract", "--base", str(base_folder), "--tuned", str(tmp_path / "tuned"), "--rank", "32",
                 "--output", str(output), "--include-other"]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj  rank 32/32  energy 1\.0000  parameters 2,048", shown)
    assert "adapter parameters" in shown and "saved whole (modules_to_save): model.embed_tokens" in shown
    assert (logits(dt.load_adapter(tiny_llama(), output)) - logits(tuned)).abs().max() < 1e-4
    assert main(["info", str(output)]) == 0 and re.search(r"loads in peft\s+yes", capsys.readouterr().out)


def test_extract_recompresses_a_lora_adapter(base_folder, tmp_path, capsys):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=8, alpha=16, targets="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters("default").values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    dt.save_adapter(model, tmp_path / "rank8")
    assert main(["extract", "--base", str(base_folder), "--tuned", str(tmp_path / "rank8"), "--rank", "8",
                 "--output", str(tmp_path / "same")]) == 0
    assert (logits(dt.load_adapter(tiny_llama(), tmp_path / "same")) - logits(model)).abs().max() < 1e-4
    assert main(["extract", "--base", str(base_folder), "--tuned", str(tmp_path / "rank8"), "--rank", "2",
                 "--output", str(tmp_path / "rank2")]) == 0
    assert "energy" in capsys.readouterr().out
    smaller = dt.load_adapter(tiny_llama(), tmp_path / "rank2")
    layer = smaller.base_model.model.layers[0].mlp.down_proj
    original = model.base_model.model.layers[0].mlp.down_proj
    delta = original.delta("default").double()  # s·B A of the rank-8 adapter
    U, S, Vh = torch.linalg.svd(delta)
    best = (U[:, :2] * S[:2]) @ Vh[:2]  # the best rank-2 approximation
    assert layer.lora_A["default"].shape == (2, 64)
    assert torch.allclose(layer.delta("default").double(), best, atol=1e-5)  # merged in fp32 first: its rounding


def test_extract_from_a_freeze_output(base_folder, tmp_path, capsys):
    model = dt.wrap(tiny_llama(), dt.FreezeTuning(trainable_layers=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters("default").values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    dt.save(model, tmp_path / "freeze")
    assert main(["extract", "--base", str(base_folder), "--tuned", str(tmp_path / "freeze"), "--energy", "1.0",
                 "--output", str(tmp_path / "lora"), "--include-other"]) == 0
    shown = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in shown and "model.layers.0." not in shown  # only the trained layer
    assert "modules_to_save): model.layers.1.input_layernorm" in shown
    assert (logits(dt.load_adapter(tiny_llama(), tmp_path / "lora")) - logits(model)).abs().max() < 1e-4


# --- bad input: one sentence each ---------------------------------------------------------------
def cli_error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error: ") and err.count("\n") == 1, err
    return err


def test_a_tuned_model_of_another_architecture_or_size_is_one_sentence(base_folder, tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "wider")
    base = ["extract", "--base", str(base_folder), "--rank", "4", "--output", str(tmp_path / "out")]
    assert "is a LlamaForCausalLM but --tuned is a GPT2LMHeadModel" in cli_error(base + ["--tuned", str(tmp_path / "gpt2")], capsys)
    err = cli_error(base + ["--tuned", str(tmp_path / "wider")], capsys)
    assert "in --base but" in err and "different model sizes" in err
    assert not (tmp_path / "out").exists()


def test_other_bad_input_is_one_sentence(base_folder, tmp_path, capsys):
    prompt = dt.wrap(tiny_llama(), dt.PromptTuning(num_virtual_tokens=2))
    dt.save_adapter(prompt, tmp_path / "prompt")
    base = ["extract", "--base", str(base_folder), "--output", str(tmp_path / "out")]
    assert "does not fold into the weights" in cli_error(base + ["--tuned", str(tmp_path / "prompt"), "--rank", "2"], capsys)
    assert "no difference to extract" in cli_error(base + ["--tuned", str(base_folder), "--rank", "2"], capsys)
    assert "energy must be a share" in cli_error(base + ["--tuned", str(base_folder), "--energy", "1.5"], capsys)
    assert "rank must be a whole number" in cli_error(base + ["--tuned", str(base_folder), "--rank", "0"], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    err = cli_error(["extract", "--base", str(base_folder), "--tuned", str(base_folder), "--rank", "2",
                     "--output", str(tmp_path / "full")], capsys)
    assert "already holds files" in err


def test_a_classifier_keeps_its_head_whole_and_its_labels(tmp_path, capsys):
    from deltatune.pretrained import bundled, load_tokenizer, load_trained

    tiny_bert().save_pretrained(tmp_path / "base")
    load_tokenizer(bundled("stories260K")).save_pretrained(tmp_path / "base")  # load_trained reads one
    tuned = fine_tuned(tiny_bert)
    tuned.save_pretrained(tmp_path / "tuned")
    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "32",
                 "--output", str(tmp_path / "lora")]) == 0
    assert "modules_to_save): classifier" in capsys.readouterr().out  # saved whole even without --include-other
    assert json.loads((tmp_path / "lora" / "labels.json").read_text())["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--rank", "32",
                 "--output", str(tmp_path / "all"), "--include-other"]) == 0
    model, _, task, labels = load_trained(tmp_path / "base", tmp_path / "all", dtype="float32")  # a fresh head, replaced
    assert (task, labels) == ("classification", ["LABEL_0", "LABEL_1", "LABEL_2"])
    assert (logits(model) - logits(tuned)).abs().max() < 1e-4


def test_a_real_full_fine_tune_extracts_exactly_at_full_rank(tmp_path, capsys):
    from deltatune.pretrained import bundled, load_causal_lm

    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    base = str(bundled("stories260K"))
    assert main(["train", "--model", base, "--data", str(data), "--output", str(tmp_path / "full"), "--method", "full",
                 "--max-steps", "3", "--quiet", "batch_size=4", "learning_rate=1e-3"]) == 0
    tuned = load_causal_lm(tmp_path / "full", "float32")
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    errors = []
    for rank in ("4", "16", "64"):  # 64: the width of stories260K's layers, the full rank of every difference
        output = tmp_path / f"rank{rank}"
        assert main(["extract", "--base", base, "--tuned", str(tmp_path / "full"), "--rank", rank,
                     "--output", str(output), "--include-other"]) == 0
        errors.append(float((logits(dt.load_adapter(load_causal_lm(base, "float32"), output), ids)
                             - logits(tuned, ids)).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4, errors
    assert "mean retained energy" in capsys.readouterr().out


def test_a_difference_in_no_linear_layer_is_one_sentence():
    tuned = tiny_llama()
    with torch.no_grad():
        tuned.model.norm.weight.add_(0.1)
    with pytest.raises(dt.DeltatuneError, match=r"No linear layer's weight differs .*model\.norm\.weight.*keep the tuned"):
        extract_lora(tiny_llama(), tuned, rank=2, include_other=True)
