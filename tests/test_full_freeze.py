"""Full and freeze tuning: which weights train, in closed form, and real learning on stories260K
with each method's own learning rate; freeze tuning's folder (only the trained tensors and the
selection) and where its backward pass stops. The shared invariants are in test_contract.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.cli import main
from deltatune.config import build_run
from deltatune.data import load_examples, tokenize_examples
from deltatune.pretrained import bundled, load_causal_lm, load_tokenizer
from deltatune.train import TrainConfig, _enable_gradient_checkpointing, train

from conftest import tiny_bart, tiny_gpt2, tiny_llama, tiny_llama_classifier


def trained(model: dt.DeltaModel) -> set[str]:
    return {name for name, p in model.base_model.named_parameters() if p.requires_grad}


def test_full_trains_every_weight_once():
    base = tiny_llama(tie_word_embeddings=True)
    model = dt.wrap(base, dt.FullFineTuning())
    assert trained(model) == {name for name, _ in base.named_parameters()}
    assert dt.trainable_parameters(model) == (sum(p.numel() for p in base.parameters()),) * 2


@pytest.mark.parametrize("layers,expected", [(1, "model.layers.1."), (-1, "model.layers.0.")])
def test_freeze_trains_the_last_or_first_layers(layers, expected):
    model = dt.wrap(tiny_llama(), dt.FreezeTuning(trainable_layers=layers))
    names = trained(model)
    assert names and all(name.startswith(expected) for name in names)
    assert names == {n for n, _ in tiny_llama().named_parameters() if n.startswith(expected)}


def test_freeze_counts_each_stack_and_adds_named_modules():
    model = dt.wrap(tiny_bart(), dt.FreezeTuning(trainable_layers=1, modules=("layernorm_embedding",)))
    names = trained(model)
    assert any(n.startswith("model.encoder.layers.1.") for n in names)
    assert any(n.startswith("model.decoder.layers.1.") for n in names)
    assert not any(".layers.0." in n for n in names)
    assert {"model.encoder.layernorm_embedding.weight", "model.decoder.layernorm_embedding.weight"} <= names
    assert "model.encoder.layernorm_embedding.weight" in names and "model.decoder.layernorm_embedding.weight" in names


def test_freeze_trains_a_classifier_head_by_default():
    model = dt.wrap(tiny_llama_classifier(), dt.FreezeTuning(trainable_layers=1))
    assert "score.weight" in trained(model)


@pytest.mark.parametrize("bad,words", [(dict(trainable_layers=0), "trains nothing"),
                                       (dict(trainable_layers=1.5), "whole number"),
                                       (dict(modules=("nowhere",)), "match no module")])
def test_bad_freeze_settings_are_one_sentence(bad, words):
    with pytest.raises(dt.DeltatuneError, match=words):
        dt.wrap(tiny_llama(), dt.FreezeTuning(**bad))


def test_weight_training_methods_refuse_disabled_and_a_second_adapter():
    model = dt.wrap(tiny_llama(), dt.FullFineTuning())
    with pytest.raises(dt.DeltatuneError, match="changed the base weights in place"):
        with dt.disabled(model):
            pass
    with pytest.raises(dt.DeltatuneError, match="one adapter per model"):
        model.add_adapter("second", dt.FreezeTuning())


def test_each_method_ships_its_own_learning_rate(tmp_path):
    settings = {"model": "m", "data": "d", "output": str(tmp_path)}
    assert build_run({**settings, "method": "full"}).train.learning_rate == 2e-5
    assert build_run({**settings, "method": "freeze"}).train.learning_rate == 3e-4
    assert build_run({**settings, "method": "full", "learning_rate": 1e-4}).train.learning_rate == 1e-4  # the user's wins
    lora_default = dt.LoRA.training_defaults.get("learning_rate", TrainConfig().learning_rate)
    assert build_run({**settings, "method": "lora"}).train.learning_rate == lora_default


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_each_lowers_held_out_loss_on_stories260k_with_its_default_learning_rate(method, tmp_path):
    tokenizer = load_tokenizer(bundled("stories260K"))
    data = lambda name, n: tokenize_examples(load_examples(bundled(f"e2e/{name}.jsonl"))[:n], tokenizer, 200)
    torch.manual_seed(0)
    model = dt.wrap(load_causal_lm(bundled("stories260K")), dt.METHODS[method]())
    learning_rate = dt.METHODS[method].training_defaults["learning_rate"]
    config = TrainConfig(max_steps=25, batch_size=8, learning_rate=learning_rate, warmup_steps=3, eval_every=25)
    result = train(model, data("train", 200), data("eval", 16), config, tmp_path, pad_token_id=2,
                   save_model=dt.save, progress=False)
    (_, before), (_, after) = result.eval_losses[0], result.eval_losses[-1]
    assert after < before - 0.1, (before, after)
    checkpoint = tmp_path / "checkpoint-25"
    if method == "full":  # a whole model folder
        reloaded = type(model.base_model).from_pretrained(checkpoint)
    else:  # the trained layers only, put back onto a fresh base
        reloaded = dt.merge(dt.load_adapter(load_causal_lm(bundled("stories260K")), checkpoint))
    assert all(torch.equal(p, dict(model.base_model.named_parameters())[n]) for n, p in reloaded.named_parameters())


# --- freeze tuning saves only what trained ---------------------------------------------------
def four_layer_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)  # stories260K's tokenizer
    return LlamaForCausalLM(config).eval()


def trained_freeze(tmp_path, base=four_layer_llama, **settings) -> tuple[dt.DeltaModel, torch.Tensor]:
    """A freeze-tuned model whose trained weights moved (one real AdamW step at a high rate), saved in tmp_path."""
    model = dt.wrap(base(), dt.FreezeTuning(**settings))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2]) if type(model.base_model).__name__.endswith("Classification") else ids
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    model.eval()
    dt.save(model, tmp_path)
    return model, ids


def test_freeze_saves_only_the_trained_tensors_and_the_selection(tmp_path):
    model, _ = trained_freeze(tmp_path, trainable_layers=2, modules=("norm",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "deltatune_method.json"]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    trained_names = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert set(saved) == trained_names  # the base model's own state-dict keys
    assert all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) for n in saved)
    assert all(torch.equal(saved[n], dict(model.base_model.named_parameters())[n]) for n in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["trainable_layers"], config["modules"]) == ("FREEZE", 2, ["norm"])
    assert config["trained_modules"] == ["model.layers.2", "model.layers.3", "model.norm"]
    assert "peft" in config["deltatune_peft_incompatible"]
    stored = sum(t.numel() for t in saved.values())
    assert stored == dt.trainable_parameters(model)[0] < sum(p.numel() for p in four_layer_llama().parameters()) / 2


def test_load_adapter_puts_the_trained_tensors_onto_the_base_and_leaves_the_rest_bit_identical(tmp_path):
    model, ids = trained_freeze(tmp_path, trainable_layers=1)
    base = four_layer_llama()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    loaded = dt.load_adapter(base, tmp_path)
    assert loaded.methods["default"] == dt.FreezeTuning(trainable_layers=1)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, param in loaded.base_model.named_parameters():
        if name.startswith("model.layers.3."):
            assert torch.equal(param, dict(model.base_model.named_parameters())[name]) and not torch.equal(param, before[name])
        else:
            assert torch.equal(param, before[name]), f"{name} is frozen but changed"
    assert not any(p.requires_grad for p in loaded.parameters())
    resumed = dt.load_adapter(four_layer_llama(), tmp_path, trainable=True)
    assert {n for n, p in resumed.base_model.named_parameters() if p.requires_grad} == {
        n for n in before if n.startswith("model.layers.3.")}


def test_a_tied_head_named_in_modules_trains_and_round_trips(tmp_path):
    model, ids = trained_freeze(tmp_path, base=tiny_gpt2, trainable_layers=1, modules=("lm_head",))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "lm_head.weight" in saved  # tied to transformer.wte.weight: one tensor, saved under the named path
    assert model.base_model.lm_head.weight is model.base_model.transformer.wte.weight
    assert not torch.equal(saved["lm_head.weight"], tiny_gpt2().lm_head.weight)
    loaded = dt.load_adapter(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_modules_may_be_a_regex_over_the_whole_path(tmp_path):
    model, ids = trained_freeze(tmp_path, trainable_layers=0, modules=r"model\.layers\.[02]\.mlp")
    assert {n.rsplit(".", 1)[0] for n in load_file(str(tmp_path / "adapter_model.safetensors"))} == {
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"}
    loaded = dt.load_adapter(four_layer_llama(), tmp_path)
    assert loaded.methods["default"].modules == r"model\.layers\.[02]\.mlp"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_cli_trains_a_freeze_folder_that_info_generate_and_merge_read(tmp_path, capsys):
    rows = [json.loads(line) for line in bundled("e2e/train.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    model, output = str(bundled("stories260K")), tmp_path / "freeze"
    assert main(["train", "--model", model, "--data", str(data), "--output", str(output), "--method", "freeze",
                 "--max-steps", "2", "--quiet", "batch_size=4", "trainable_layers=1"]) == 0
    assert not (output / "model.safetensors").exists() and (output / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["info", str(output)]) == 0
    shown = capsys.readouterr().out
    assert "FREEZE (freeze)" in shown and re.search(r"trained modules\s+\['model.layers.4'\]", shown)
    assert main(["generate", "--model", model, "--adapter", str(output), "--prompt", "name : Aromi |",
                 "--max-new-tokens", "3"]) == 0
    assert main(["merge", "--model", model, "--adapter", str(output), "--output", str(tmp_path / "merged")]) == 0
    assert "max / mean |logit difference| vs the adapter model: 0 / 0" in capsys.readouterr().out


def test_a_freeze_folder_on_another_model_is_one_sentence(tmp_path):
    trained_freeze(tmp_path, trainable_layers=1)
    with pytest.raises(dt.DeltatuneError, match="has no matching module in this base model"):
        dt.load_adapter(tiny_llama(), tmp_path)  # 2 layers: its last layer is model.layers.1, not 3


def test_merge_writes_a_whole_model_and_info_describes_the_folder(tmp_path, capsys):
    base_dir, adapter, merged = tmp_path / "base", tmp_path / "freeze", tmp_path / "merged"
    four_layer_llama().save_pretrained(base_dir)
    load_tokenizer(bundled("stories260K")).save_pretrained(base_dir)  # any tokenizer: merge copies it
    model, ids = trained_freeze(adapter, trainable_layers=2)
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output", str(merged)]) == 0
    whole = LlamaForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, model(input_ids=ids).logits)
    capsys.readouterr()
    assert main(["info", str(adapter)]) == 0
    shown = capsys.readouterr().out
    assert "FREEZE (freeze)" in shown and "model.layers.2" in shown and "model.layers.3" in shown
    assert f"{dt.trainable_parameters(model)[0]:,}" in shown
    assert re.search(r"loads in peft\s+no: peft has no freeze-tuning adapter type", shown)


def test_a_freeze_classifier_keeps_its_trained_head(tmp_path):
    model, ids = trained_freeze(tmp_path, base=tiny_llama_classifier, trainable_layers=1)
    assert "score.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    fresh = tiny_llama_classifier()
    torch.nn.init.normal_(fresh.score.weight, generator=torch.Generator().manual_seed(5))  # another fresh head
    loaded = dt.load_adapter(fresh, tmp_path)  # the trained head replaces it
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- the backward pass stops at the first trained layer ---------------------------------------
def layer_outputs_requiring_grad(model: dt.DeltaModel) -> list[bool]:
    """For each decoder layer of a forward in training mode: does its output require grad? Where it
    does not, autograd records nothing, so the backward pass cannot reach that layer or below."""
    seen: list[bool] = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad)) for layer in model.base_model.model.layers]
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return seen


def test_the_backward_pass_stops_below_the_first_trained_layer():
    model = dt.wrap(four_layer_llama(), dt.FreezeTuning(trainable_layers=2))
    assert not model.base_model.get_input_embeddings().weight.requires_grad
    assert layer_outputs_requiring_grad(model) == [False, False, True, True]
    frozen = [p for n, p in model.base_model.named_parameters() if not n.startswith(("model.layers.2", "model.layers.3"))]
    assert all(p.grad is None for p in frozen)


def test_the_backward_pass_stops_there_with_gradient_checkpointing_too():
    model = dt.wrap(four_layer_llama(), dt.FreezeTuning(trainable_layers=2))
    _enable_gradient_checkpointing(model)
    assert layer_outputs_requiring_grad(model) == [False, False, True, True]
